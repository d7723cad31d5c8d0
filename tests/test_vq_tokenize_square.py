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
