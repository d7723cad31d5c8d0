"""Official VQA accuracy on hand-made adversarial cases.

Every expected value below was worked out by hand from the official rules
(GT-Vision-Lab/VQA vqaEval.py at HEAD), not produced by running an implementation.
"""

import json

import pytest

from mmkit.errors import MmkitError
from mmkit.eval.vqa import (
    CONTRACTIONS,
    normalize_answer,
    normalize_punctuation,
    round_official,
    score_vqa,
    vqa_accuracy,
)


def acc(pred, answers, mode="official"):
    return round_official(100 * vqa_accuracy(pred, answers, mode))


def test_unanimous_is_exact_and_case_sensitive():
    gt = ["yes"] * 10
    assert acc("yes", gt) == 100.0
    assert acc("Yes", gt) == 0.0  # no lower-casing when the 10 answers agree
    assert acc("yes.", gt) == 0.0  # no punctuation rules either
    assert acc("  yes\n", gt) == 100.0  # but \n/\t -> space and strip always
    assert acc("yes.", gt, "lenient") == 100.0  # lenient always normalises
    assert acc("Yes", gt, "lenient") == 100.0


def test_unanimity_is_judged_after_strip():
    # " yes" and "yes" are the same after strip -> unanimous -> exact, "YES" scores 0
    assert acc("YES", ["yes"] * 9 + [" yes"]) == 0.0
    # "Yes" differs -> normalise everything -> "YES" matches all 10
    assert acc("YES", ["yes"] * 9 + ["Yes"]) == 100.0


def test_leave_one_out_counts():
    # k matching GT answers out of 10: mean over the 10 leave-one-out subsets of min(1, m/3)
    assert acc("red", ["red"] * 1 + ["blue"] * 9) == 30.0  # 9 * (1/3) / 10
    assert acc("red", ["red"] * 2 + ["blue"] * 8) == 60.0  # (2*(1/3) + 8*(2/3)) / 10
    assert acc("red", ["red"] * 3 + ["blue"] * 7) == 90.0  # (3*(2/3) + 7*1) / 10
    assert acc("red", ["red"] * 4 + ["blue"] * 6) == 100.0
    assert acc("green", ["red"] * 4 + ["blue"] * 6) == 0.0


def test_numbers_periods_and_digit_commas():
    gt = ["2"] * 5 + ["two"] * 5  # "two" -> "2"
    assert acc("Two", gt) == 100.0
    assert acc("2.", gt) == 100.0  # a period not followed by a digit is deleted
    assert acc("2.0", gt) == 0.0  # a period before a digit stays
    assert acc("none", ["0"] * 3 + ["zero"] * 3 + ["1"] * 4) == 100.0  # none/zero -> 0
    assert acc("1000", ["1,000"] * 5 + ["1000"] * 5) == 100.0  # digit comma: commas deleted
    assert normalize_punctuation("1,000") == "1000"
    assert normalize_punctuation("3.5.") == "3.5"
    assert normalize_punctuation("u.s.a.") == "usa"
    assert normalize_punctuation("." * 40) == "." * 8  # re.UNICODE lands in count: 32 at most
    # \d is ASCII-only: Arabic-Indic digits are no digits for the comma/period rules
    assert normalize_punctuation("\u0663,\u0663") == "\u0663 \u0663"
    assert normalize_punctuation("\u0663.\u0663") == "\u0663\u0663"


def test_punctuation_delete_or_space():
    assert normalize_punctuation("t-shirt") == "t shirt"  # no adjacent space -> space
    assert normalize_punctuation("x-y -z") == "xy z"  # one " -" -> every "-" deleted
    assert normalize_punctuation("1,000-2") == "10002"  # a digit comma deletes all punctuation
    assert normalize_punctuation("yes?") == "yes "
    # not in the list: ' : $ % # & * stay
    assert normalize_punctuation("it's 5:00 $ 10% #1 & *") == "it's 5:00 $ 10% #1 & *"
    assert acc("t shirt", ["t-shirt"] * 5 + ["shirt"] * 5) == 100.0
    assert acc("tshirt", ["t-shirt"] * 5 + ["shirt"] * 5) == 0.0


def test_articles_and_contractions():
    assert acc("The Dog.", ["a dog"] * 4 + ["dog"] * 6) == 100.0
    assert normalize_answer("an apple and the pear") == "apple and pear"
    assert acc("dont know", ["dont know"] * 3 + ["don't know"] * 3 + ["no"] * 4) == 100.0
    # quirk: "somebody'd" -> "somebodyd"; 3 of 10 GT -> (3*(2/3) + 7) / 10
    assert acc("somebody'd", ["somebodyd"] * 3 + ["x"] * 7) == 90.0
    assert normalize_answer("Im") == "im"  # capitalised keys never match after lower()
    assert len(CONTRACTIONS) == 120


def test_answer_dict_inequality_quirk():
    # Without answer_id, identical dicts leave each other out: for a "yes" GT the other
    # "yes" dicts are excluded too -> 0 matches; for a "no" GT all 7 "yes" -> 1.
    gt = [{"answer": "yes"}] * 7 + [{"answer": "no"}] * 3
    assert acc("yes", gt) == 30.0
    gt_ids = [{"answer": "yes", "answer_id": i} for i in range(7)] + [
        {"answer": "no", "answer_id": 7 + i} for i in range(3)]
    assert acc("yes", gt_ids) == 100.0


def test_rounding_is_python2_half_away_from_zero():
    assert round_official(100 * 97.0 / 800) == 12.13  # exact tie 12.125; Python 3 round() gives 12.12
    assert round_official(2.675) == 2.67  # 2.675 is below the tie in binary
    assert round_official(100 / 3) == 33.33
    assert round_official(200 / 3) == 66.67


def _ann(qid, answers, qtype="what color", atype="other"):
    return {"question_id": qid, "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
            "answer": answers[0], "question_type": qtype, "answer_type": atype}


def test_score_breakdown_and_overall_tie():
    records = [_ann(i, ["yes"] * 10, "is the", "yes/no") for i in range(800)]
    preds = {i: ("yes" if i < 97 else "no") for i in range(800)}
    out = score_vqa(preds, records)
    assert out["overall"] == 12.13 and out["perAnswerType"] == {"yes/no": 12.13}
    records = [_ann(1, ["red"] * 2 + ["blue"] * 8), _ann(2, ["2"] * 10, "how many", "number"),
               _ann(3, ["blue"] * 10)]
    out = score_vqa({1: "red", 2: "2", 3: "Blue"}, records)
    assert out["perQuestion"] == {1: 60.0, 2: 100.0, 3: 0.0}
    assert out["overall"] == 53.33  # (0.6 + 1 + 0) / 3
    assert out["perQuestionType"] == {"what color": 30.0, "how many": 100.0}
    assert out["perAnswerType"] == {"other": 30.0, "number": 100.0}
    lenient = score_vqa({1: "red", 2: "2", 3: "Blue"}, records, mode="lenient")
    assert lenient["overall"] == 86.67
    exact = score_vqa({1: "red", 2: "2", 3: "Blue"}, records, mode="exact")
    assert exact["overall"] == 66.67  # gold = first answer: red, 2, blue
    gqa = [{"question_id": "q1", "answers": ["yes"], "answer": "yes", "question_type": "verify", "answer_type": "yn"}]
    with pytest.raises(MmkitError, match="use --mode exact"):
        score_vqa({"q1": "yes"}, gqa)
    assert score_vqa({"q1": " yes"}, gqa, mode="exact")["overall"] == 100.0


def test_missing_predictions():
    records = [_ann(i, ["yes"] * 10) for i in range(5)]
    with pytest.raises(MmkitError, match="3 of 5 annotated questions have no prediction"):
        score_vqa({0: "yes", 1: "yes"}, records)
    with pytest.raises(MmkitError, match="1 predicted question ids are not annotated"):
        score_vqa({i: "yes" for i in range(6)}, records)
    out = score_vqa({0: "yes", 1: "no"}, records, allow_missing=True)
    assert out["n"] == 2 and out["overall"] == 50.0 and out["missing"] == 3


def _write_vqa(tmp_path):
    anns = {"annotations": [
        {"question_id": 1, "image_id": 1, "question_type": "what color", "answer_type": "other",
         "multiple_choice_answer": "red",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                     for i, a in enumerate(["red"] * 3 + ["Red."] * 2 + ["blue"] * 5)]},
        {"question_id": 2, "image_id": 1, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2",
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
    ]}
    qs = {"questions": [{"question_id": 1, "image_id": 1, "question": "What color?"},
                        {"question_id": 2, "image_id": 1, "question": "How many?"}]}
    (tmp_path / "a.json").write_text(json.dumps(anns))
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "p.json").write_text(json.dumps([{"question_id": 1, "answer": "RED"},
                                                 {"question_id": 2, "answer": "two"}]))
    (tmp_path / "p1.json").write_text(json.dumps([{"question_id": 1, "answer": "red"}]))


def test_cli_vqa_score(tmp_path, capsys):
    from mmkit.cli import main

    _write_vqa(tmp_path)
    base = ["eval", "vqa-score", "--annotations", str(tmp_path / "a.json"), "--questions", str(tmp_path / "q.json")]
    assert main(base + ["--predictions", str(tmp_path / "p.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # q1: "Red." -> "red": 5 red -> 100; q2 unanimous "2": "two" is not normalised -> 0
    assert out["overall"] == 50.0
    assert out["perAnswerType"] == {"other": 100.0, "number": 0.0}
    assert out["perQuestionType"] == {"what color": 100.0, "how many": 0.0}
    assert main(base + ["--predictions", str(tmp_path / "p.json"), "--json", "--mode", "lenient"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == 100.0
    assert main(base + ["--predictions", str(tmp_path / "p1.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert "1 of 2 annotated questions have no prediction" in err and len(err.splitlines()) == 1
    assert main(base + ["--predictions", str(tmp_path / "p1.json"), "--allow-missing"]) == 0
    assert "Overall Accuracy is: 100.00" in capsys.readouterr().out
    assert main(base + ["--predictions", str(tmp_path / "nope.json")]) == 2


def test_cli_gqa_and_textvqa_formats(tmp_path, capsys):
    from mmkit.cli import main

    gqa = {"201": {"question": "Is it red?", "imageId": "n1", "answer": "yes",
                   "types": {"structural": "verify", "detailed": "verifyAttr"}},
           "202": {"question": "What is it?", "imageId": "n2", "answer": "circle",
                   "types": {"structural": "query", "detailed": "objName"}}}
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    (tmp_path / "gp.json").write_text(json.dumps([{"questionId": "201", "prediction": "yes"},
                                                  {"questionId": "202", "prediction": "Circle"}]))
    assert main(["eval", "vqa-score", "--predictions", str(tmp_path / "gp.json"), "--annotations",
                 str(tmp_path / "gqa.json"), "--mode", "exact", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"] == 50.0 and out["perAnswerType"] == {"verify": 100.0, "query": 0.0}  # case counts
    # TextVQA: answers are plain strings; lenient (EvalAI) normalises "Coca-Cola" -> "coca cola"
    tv = {"data": [{"question_id": 7, "image_id": "abc", "question": "What brand?",
                    "answers": ["coca cola"] * 2 + ["Coca-Cola"] * 2 + ["pepsi"] * 6}]}
    (tmp_path / "tv.json").write_text(json.dumps(tv))
    (tmp_path / "tp.json").write_text(json.dumps([{"question_id": 7, "answer": "coca cola"}]))
    assert main(["eval", "vqa-score", "--predictions", str(tmp_path / "tp.json"), "--annotations",
                 str(tmp_path / "tv.json"), "--mode", "lenient", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == 100.0  # 4 matches of 10
