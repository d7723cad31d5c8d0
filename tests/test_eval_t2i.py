"""Text-to-image scoring on rendered shapes scenes (right and wrong images), CLIPScore, GenEval layout."""

import json

import pytest

from mmkit.data.shapes import Obj, Scene, render
from mmkit.eval import t2i


def _img(*objs, w=96, h=96):
    return render(Scene(w, h, [Obj(*o) for o in objs]))


def test_correct_images_score_100():
    prompts = ["A large red circle at the top left.",
               "There are two objects: a small green square in the center and a large yellow triangle at the bottom right.",
               "An image with a small blue diamond (top right), a large purple circle (left) and a small cyan square (bottom)."]
    imgs = [_img(("circle", "red", "large", "left", "top")),
            _img(("square", "green", "small", "center", "middle"), ("triangle", "yellow", "large", "right", "bottom")),
            _img(("diamond", "blue", "small", "right", "top"), ("circle", "purple", "large", "left", "middle"),
                 ("square", "cyan", "small", "center", "bottom"), w=80, h=64)]
    out = t2i.score_shapes_t2i(imgs, prompts)
    assert out == {"color": 100.0, "shape": 100.0, "size": 100.0, "position": 100.0, "count": 100.0,
                   "attribute_accuracy": 100.0, "overall": 100.0, "all_correct": 100.0, "n": 3}


def test_wrong_images_by_hand():
    prompts = ["A large red circle at the top left.",
               "There are two objects: a small green square in the center and a large yellow triangle at the bottom right."]
    imgs = [_img(("circle", "blue", "large", "left", "top")),  # wrong colour only
            _img(("square", "green", "small", "center", "middle"))]  # the triangle is missing
    out = t2i.score_shapes_t2i(imgs, prompts)
    # 3 asked objects: colour right 1/3 (green square); shape, size, position right 2/3;
    # count right in 1 of 2 images; headline = mean(colour, shape, count, position)
    assert out["color"] == 33.33 and out["shape"] == 66.67 and out["position"] == 66.67 and out["size"] == 66.67
    assert out["count"] == 50.0
    assert out["attribute_accuracy"] == round((100 / 3 + 200 / 3 + 50 + 200 / 3) / 4, 2) == 54.17
    assert out["all_correct"] == 0.0
    # wrong cell only; entries may carry the scene instead of relying on the prompt text
    scene = Scene(64, 64, [Obj("circle", "red", "small", "left", "top")])
    out = t2i.score_shapes_t2i([_img(("circle", "red", "small", "right", "bottom"), w=64, h=64)],
                               [{"prompt": "ignored", "scene": scene.to_dict()}])
    assert (out["color"], out["shape"], out["size"], out["position"], out["count"]) == (100.0, 100.0, 100.0, 0.0, 100.0)
    # an extra object: every asked attribute right, count wrong
    out = t2i.score_shapes_t2i([_img(("circle", "red", "large", "left", "top"), ("square", "blue", "small", "right", "bottom"))],
                               ["A large red circle at the top left."])
    assert (out["color"], out["position"], out["count"], out["all_correct"]) == (100.0, 100.0, 0.0, 0.0)


def test_geneval_layout(tmp_path):
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"}]
    imgs = [[_img(("circle", "red", "large", "left", "top"))] * 4, [_img(("square", "red", "small", "left", "top"))] * 4]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    t2i.write_geneval(tmp_path / "out", t2i.read_geneval_metadata(tmp_path / "meta.jsonl"), imgs)
    for i, m in enumerate(meta):
        d = tmp_path / "out" / f"{i:05d}"
        assert json.loads((d / "metadata.jsonl").read_text()) == m
        assert sorted(p.name for p in (d / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]


def test_clip_score_local_checkpoint(tmp_path):
    """Hessel CLIPScore from a local safetensors file; force_quick_gelu changes embeddings."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "mmkit-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "mmkit-tiny-clip.json")
    torch.manual_seed(0)
    ref = open_clip.create_model("mmkit-tiny-clip", force_quick_gelu=True).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "clip.safetensors"))

    model, preprocess, tok = t2i.load_clip("mmkit-tiny-clip", tmp_path / "clip.safetensors")
    images = [_img(("circle", "red", "large", "left", "top")), _img(("square", "blue", "small", "center", "middle"))]
    texts = ["a red circle", "a blue square"]
    out = t2i.clip_score(images, texts, model, preprocess, tok)
    with torch.no_grad():
        im = torch.nn.functional.normalize(ref.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
        tx = torch.nn.functional.normalize(ref.encode_text(tok(["A photo depicts " + t for t in texts])), dim=-1)
    expect = 2.5 * (im * tx).sum(-1).clamp(min=0)
    assert out["per_image"] == pytest.approx(expect.tolist(), abs=1e-6)
    assert out["clip_score"] == pytest.approx(expect.mean().item(), abs=1e-6)
    gelu, _, _ = t2i.load_clip("mmkit-tiny-clip", tmp_path / "clip.safetensors", force_quick_gelu=False)
    with torch.no_grad():
        x = torch.stack([preprocess(i) for i in images])
        assert not torch.allclose(gelu.encode_image(x), model.encode_image(x), atol=1e-5)
    with pytest.raises(Exception, match="not found"):
        t2i.load_clip("mmkit-tiny-clip", tmp_path / "missing.safetensors")

    # the runner adds the same CLIPScore to the t2i metrics when the task names a checkpoint
    from mmkit.eval import runner

    class Painter:
        def generate_images(self, prompts, cfg_scale, seed):
            return images[: len(prompts)]

    (tmp_path / "p.json").write_text(json.dumps([{"prompt": t} for t in texts]))
    cfg = runner.TaskConfig(name="t", task="t2i", prompts=str(tmp_path / "p.json"), clip_model="mmkit-tiny-clip",
                            clip_checkpoint=str(tmp_path / "clip.safetensors"))
    res = runner.run_t2i(Painter(), cfg)
    assert res["metrics"]["clip_score"] == round(out["clip_score"], 4)
