"""`tokenize-images --square S`: one S/f x S/f code grid for every image, and a square
Chameleon model (`model.image_size: S`) reads images exactly as the stored codes were made."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from mmkit.cli import main
from mmkit.vq.model import VQModel


def _docs_and_images(shard_dir):
    """[(doc, {member: PIL image})] of every sample in a directory of shards."""
    out = []
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as t:
            members = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                doc = json.loads(data)
                imgs = {n: Image.open(io.BytesIO(members[f"{key}.{n}"])).convert("RGB")
                        for n in doc["images"] if n is not None}
                out.append((doc, imgs))
    return out


@pytest.fixture(scope="module")
def square_codes(tiny_shards, tiny_vq_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("codes48")
    assert main(["data", "tokenize-images", "--model", str(tiny_vq_dir), str(tiny_shards / "train"), "--out", str(out),
                 "--square", "48", "--json"]) == 0
    return out


def test_square_codes_have_the_requested_grid(tiny_shards, tiny_vq_dir, square_codes, tmp_path, capsys):
    from mmkit.vq.task import image_to_tensor
    from mmkit.vq.tokenize_shards import square_image

    model = VQModel.from_pretrained(tiny_vq_dir)
    f = model.downsample
    docs = _docs_and_images(square_codes)
    sizes = {im.size for _, imgs in docs for im in imgs.values()}
    assert len(sizes) > 1 and any(w != h for w, h in sizes)  # the stored images keep their own sizes
    n = 0
    for doc, imgs in docs:
        for name, c in zip(doc["images"], doc["image_codes"]):
            if name is None:
                continue
            assert (c["h"], c["w"]) == (48 // f, 48 // f)
            ref = model.encode(image_to_tensor(square_image(imgs[name], 48))[None])[0]
            assert c["codes"] == ref.reshape(-1).tolist()
            n += 1
    assert n > 0
    # default (no --square): each image at its own size, as before
    capsys.readouterr()
    assert main(["data", "tokenize-images", "--model", str(tiny_vq_dir), str(tiny_shards / "train"), "--out",
                 str(tmp_path / "native"), "--json"]) == 0
    for doc, imgs in _docs_and_images(tmp_path / "native"):
        for name, c in zip(doc["images"], doc["image_codes"]):
            if name is not None:
                w, h = imgs[name].size
                assert (c["h"], c["w"]) == (h // f, w // f)
    # a side that is not a multiple of the VQ factor is a one-line usage error
    capsys.readouterr()
    assert main(["data", "tokenize-images", "--model", str(tiny_vq_dir), str(tiny_shards / "train"), "--out",
                 str(tmp_path / "bad"), "--square", "50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--square 50" in err[0]


def _square_task(tmp_path, tiny_vq_dir, sources, **model_kw):
    from mmkit.models.chameleon.task import ChameleonTask
    from mmkit.text.tokenizer import train_bpe

    tok = train_bpe(["Question: what color is the circle? Answer: red", "Caption: a red circle",
                     "Draw: a green triangle at the top left"] * 10, vocab_size=300, min_frequency=1)
    tok.save_pretrained(str(tmp_path / "tok"))
    section = {"text_tokenizer": str(tmp_path / "tok"), "vq": str(tiny_vq_dir), "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, **model_kw}
    return ChameleonTask(section, {"sources": str(sources), "seq_len": 128}, seed=0)


@pytest.mark.parametrize("multires", [True, False])
def test_square_pipeline_reads_images_like_tokenize_images(tiny_shards, tiny_vq_dir, square_codes, tmp_path, multires):
    """A model with image_size 48: the pipeline's codes of a stored image == the stored
    --square 48 codes; its prompts and generated images use the same 6x6 grid."""
    from mmkit.generation.pipelines import ChameleonPipeline
    from mmkit.generation.sampler import image_layout_from_config

    task = _square_task(tmp_path, tiny_vq_dir, square_codes, image_size=48, multires=multires, max_grid_size=8)
    model = task.build_model()
    assert model.config.image_size == 48 and (model.config.image_grid_h, model.config.image_grid_w) == (6, 6)
    pipe = ChameleonPipeline(model, task.tokenizer, task.vq)
    docs = _docs_and_images(square_codes)
    for doc, imgs in docs[:6]:
        for name, c in zip(doc["images"], doc["image_codes"]):
            if name is None:
                continue
            codes = pipe.encode_images([imgs[name]])[0]
            assert codes.reshape(-1).tolist() == c["codes"]
    # training batches decode the stored 6x6 grids; generated images have the same grid by default
    batch = next(iter(task.batches(batch_size=4)))
    loss, _ = task.loss(model, batch)
    assert torch.isfinite(loss)
    assert (image_layout_from_config(model.config).h, image_layout_from_config(model.config).w) == (6, 6)
    out = pipe.generate_image_codes(["a red circle"], cfg_scale=1.0, seed=0)
    assert out.shape == (1, 6, 6)


def test_square_model_rejects_codes_of_another_grid(tiny_shards, tiny_vq_dir, tmp_path):
    """Codes tokenized without --square (or with another S) are an error, not silent garbage."""
    from mmkit.errors import UsageError

    native = tmp_path / "native"
    assert main(["data", "tokenize-images", "--model", str(tiny_vq_dir), str(tiny_shards / "train"), "--out", str(native),
                 "--json"]) == 0
    task = _square_task(tmp_path, tiny_vq_dir, native, image_size=48, multires=True, max_grid_size=16)
    with pytest.raises(UsageError, match="--square 48"):
        for _ in zip(range(3), task.batches(batch_size=8)):
            pass
    with pytest.raises(UsageError, match="multiple of the VQ"):
        _square_task(tmp_path, tiny_vq_dir, native, image_size=50).config


def test_quickstart_codes_follow_the_recipe_image_size(tmp_path):
    """The quickstart's codes stage passes --square S where the Chameleon recipe reads S px squares."""
    from mmkit.quickstart import _chameleon_image_size, recipes_root

    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: chameleon\nmodel: {image_size: 48}\n")
    assert _chameleon_image_size(recipe, []) == 48
    assert _chameleon_image_size(recipe, ["model.image_size=72"]) == 72
    assert _chameleon_image_size(recipe, ["model.image_size=null"]) is None
    from mmkit.config import read_yaml

    real = recipes_root() / "training/chameleon-shapes.yaml"
    assert _chameleon_image_size(real, []) == read_yaml(real)["model"].get("image_size")


def test_source_size_tokens_name_the_source_aspect(tiny_shards, tiny_vq_dir, square_codes, tmp_path):
    """model.source_size_tokens: the size tokens of a square model say the source image's size
    (VQ-factor units), in training (stored src_w/src_h, or the image header) and in the
    pipeline's prompts; generated images ask for a square source unless a size is given, and
    are then resized to that aspect."""
    from mmkit.errors import UsageError
    from mmkit.generation.pipelines import ChameleonPipeline
    from mmkit.generation.sampler import generate, image_layout_from_config
    from mmkit.models.chameleon.processor import ChameleonProcessor

    task = _square_task(tmp_path, tiny_vq_dir, square_codes, image_size=48, multires=True, max_grid_size=16,
                        source_size_tokens=True)
    model = task.build_model()
    cfg = model.config
    proc = ChameleonProcessor.from_config(task.tokenizer, cfg)
    off, f = cfg.size_token_offset, 48 // cfg.image_grid_h
    docs = _docs_and_images(square_codes)
    seen_aspects = set()
    for doc, imgs in docs:
        for i, (name, c) in enumerate(zip(doc["images"], doc["image_codes"])):
            if name is None:
                continue
            w, h = imgs[name].size
            assert (c["src_w"], c["src_h"]) == (w, h)  # tokenize-images records the source size
            want = [cfg.boi_token_id, off + round(h / f), off + round(w / f)]
            reader_doc = {"meta": {"image_codes": doc["image_codes"]}, "images": [None] * len(doc["images"])}
            assert proc.doc_image_ids(reader_doc, i)[:3] == want
            # shards tokenized before src_w/src_h existed: the size comes from the image bytes
            old = [{k: v for k, v in (e or {}).items() if not k.startswith("src_")} or None for e in doc["image_codes"]]
            data = io.BytesIO()
            imgs[name].save(data, format="PNG")
            legacy = {"meta": {"image_codes": old}, "images": [data.getvalue() if j == i else None
                                                               for j in range(len(doc["images"]))]}
            assert proc.doc_image_ids(legacy, i)[:3] == want
            seen_aspects.add(w == h)
    assert seen_aspects == {True, False}
    loss, _ = task.loss(model, next(iter(task.batches(batch_size=4))))
    assert torch.isfinite(loss)

    pipe = ChameleonPipeline(model, task.tokenizer, task.vq)
    seen = []
    pipe._run_text = lambda prompts, max_new_tokens=None: seen.extend(prompts) or ["yes"] * len(prompts)
    im = Image.new("RGB", (96, 48), (200, 30, 30))
    pipe.answer([im], ["what color is the circle?"])
    codes = pipe.encode_images([im])[0]
    assert seen == [proc.vqa_prompt_ids(codes, "what color is the circle?", (96, 48))]
    assert seen[0][seen[0].index(cfg.boi_token_id) + 1:][:2] == [off + 6, off + 12]

    # generation: a square source by default, or the asked one (the code grid stays 6x6)
    assert image_layout_from_config(cfg).template()[:2] == [off + 6, off + 6]
    ids = torch.tensor([pipe.t2i_ids("a red circle")])
    new = generate(model, ids, image_layout_from_config(cfg).span_len, mode="image", image_size_tokens=(6, 12),
                   image_sampling={"do_sample": False}, seed=0)
    assert new[0, :2].tolist() == [off + 6, off + 12] and new[0, -1].item() == cfg.eoi_token_id
    assert pipe.generate_images(["a red circle"], cfg_scale=1.0)[0].size == (48, 48)
    wide = pipe.generate_images(["a red circle"], cfg_scale=1.0, size=(6, 12))[0]
    assert wide.size == (96, 48)
    with pytest.raises(UsageError, match="source size"):
        pipe.generate_images(["a red circle"], size=(6, 17))
    plain = _square_task(tmp_path, tiny_vq_dir, square_codes, image_size=48, multires=True, max_grid_size=16)
    with pytest.raises(UsageError, match="size_tokens"):
        image_layout_from_config(plain.build_model().config, size_tokens=(6, 12))
    with pytest.raises(UsageError, match="source_size_tokens needs"):
        _square_task(tmp_path, tiny_vq_dir, square_codes, image_size=48, source_size_tokens=True).config


def test_vq_square_data_and_eval_see_the_square_model_view(tiny_shards, tiny_vq_dir, tmp_path, capsys):
    """data.square / eval-vq --square: the tokenizer trains and is measured on the S x S
    images a square Chameleon model reads (tokenize-images --square), not on native sizes."""
    from mmkit.errors import UsageError
    from mmkit.vq.evaluate import evaluate, evaluate_images
    from mmkit.vq.task import CropImages, VQTask
    from mmkit.vq.tokenize_shards import vq_pixels

    docs = _docs_and_images(tiny_shards / "train")
    doc = {"__key__": "k", "images": list(docs[0][1].values())}
    whole = CropImages(48, False, 0, 4, 1, square=48)(doc)
    assert torch.equal(whole, torch.stack([vq_pixels(im, 48) for im in doc["images"]]))
    assert CropImages(32, False, 0, 4, 1, square=48)(doc).shape[-2:] == (32, 32)
    model_cfg = json.loads((tiny_vq_dir / "config.json").read_text())
    model_cfg = {k: model_cfg[k] for k in ("base_channels", "channel_multiplier", "latent_channels", "embed_dim",
                                           "codebook_size", "norm_groups", "mid_attn")}
    with pytest.raises(UsageError, match="data.square 50"):
        VQTask(model_cfg, {"sources": str(tiny_shards / "train"), "crop": 48, "square": 50})
    with pytest.raises(UsageError, match="exceeds data.square"):
        VQTask(model_cfg, {"sources": str(tiny_shards / "train"), "crop": 64, "square": 48})

    with pytest.raises(UsageError, match="square_prob 1.5"):
        VQTask(model_cfg, {"sources": str(tiny_shards / "train"), "crop": 48, "square_prob": 1.5})
    with pytest.raises(UsageError, match="square_prob needs data.square null"):
        VQTask(model_cfg, {"sources": str(tiny_shards / "train"), "crop": 48, "square": 48, "square_prob": 0.5})

    model = VQModel.from_pretrained(tiny_vq_dir)
    imgs = [vq_pixels(im, 48) for _, ims in _docs_and_images(tiny_shards / "eval") for im in ims.values()]
    ref = evaluate_images(model, imgs)
    res = evaluate(tiny_vq_dir, [str(tiny_shards / "eval")], square=48)
    assert res["images"] == len(imgs) and res["psnr"] == pytest.approx(ref["psnr"], abs=1e-6)
    assert res["psnr"] != pytest.approx(evaluate(tiny_vq_dir, [str(tiny_shards / "eval")])["psnr"], abs=1e-3)
    capsys.readouterr()
    assert main(["tokenizer", "eval-vq", "--model", str(tiny_vq_dir), "--data", str(tiny_shards / "eval"),
                 "--square", "48", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["psnr"] == pytest.approx(ref["psnr"], abs=1e-6)


def test_vq_square_prob_mixes_whole_squashed_images_into_the_crops(tiny_shards):
    """data.square_prob: that share of images is the whole image resized to crop x crop (what a square
    Chameleon model's codes see), the rest native-size crops; drawn per (seed, key, image, epoch)."""
    from mmkit.vq.task import CropImages
    from mmkit.vq.tokenize_shards import vq_pixels

    imgs = [im for _, ims in _docs_and_images(tiny_shards / "train") for im in ims.values()]
    docs = [{"__key__": f"k{i}", "images": [im]} for i, im in enumerate(imgs)]
    whole = [vq_pixels(im, 16) for im in imgs]
    crops = [CropImages(16, False, 0, 4, 1)(d)[0] for d in docs]
    assert all(CropImages(16, False, 0, 4, 1, square_prob=1.0)(d)[0].equal(w) for d, w in zip(docs, whole))
    assert all(CropImages(16, False, 0, 4, 1, square_prob=0.0)(d)[0].equal(c) for d, c in zip(docs, crops))
    mix = CropImages(16, False, 0, 4, 1, square_prob=0.5)
    got = [mix(d)[0] for d in docs]
    n_whole = sum(g.equal(w) for g, w in zip(got, whole))
    assert all(g.equal(w) or g.equal(c) for g, w, c in zip(got, whole, crops))
    assert 0 < n_whole < len(docs), (n_whole, len(docs))
    assert all(a.equal(b) for a, b in zip(got, [mix(d)[0] for d in docs]))  # deterministic
    # flips apply to the squashed images too, with the same seeded draw
    flipped = [CropImages(16, True, 0, 4, 1, square_prob=1.0)(d)[0] for d in docs]
    assert all(f.equal(w) or f.equal(w.flip(-1)) for f, w in zip(flipped, whole))
    assert any(f.equal(w.flip(-1)) and not f.equal(w) for f, w in zip(flipped, whole))
