"""Prompt templates shared by training (tasks) and inference (generation, eval runner).

One place, so that a model is always asked at inference exactly as it was trained.
Text only: each family turns images into its own tokens (VQ codes or ViT features)
at the position where the template puts the image.
"""

from __future__ import annotations

# Image first, then the question; the model continues with " {answer}" and eos.
# (Question-first layouts put VQA_QUESTION before the image and VQA_ANSWER_CUE after it.)
VQA_QUESTION = "Question: {question}"
VQA_ANSWER_CUE = "Answer:"
VQA_PROMPT = VQA_QUESTION + " " + VQA_ANSWER_CUE
# Image first, then this prompt; the model continues with " {caption}" and eos.
CAPTION_PROMPT = "Caption:"
# Text first, then the image (Chameleon family); condition dropout replaces the
# caption by T2I_UNCOND for classifier-free guidance.
T2I_PROMPT = "Draw: {caption}"
T2I_UNCOND = "Draw:"


def vqa_prompt(question: str) -> str:
    return VQA_PROMPT.format(question=question.strip())


def vqa_question(question: str) -> str:
    """The question half of `vqa_prompt` (without the answer cue)."""
    return VQA_QUESTION.format(question=question.strip())


def vqa_target(answer: str) -> str:
    return " " + answer.strip()


def caption_prompt() -> str:
    return CAPTION_PROMPT


def caption_target(caption: str) -> str:
    return " " + caption.strip()


def t2i_prompt(caption: str | None) -> str:
    return T2I_UNCOND if not caption else T2I_PROMPT.format(caption=caption.strip())


def postprocess_answer(text: str) -> str:
    """Generated answer -> the string scored: first line, stripped, trailing period dropped."""
    text = text.strip().split("\n")[0].strip()
    for stop in ("Question:", "Answer:", "Caption:"):
        text = text.split(stop)[0].strip()
    return text[:-1].strip() if text.endswith(".") and not text[:-1].strip().replace(".", "").isdigit() else text
