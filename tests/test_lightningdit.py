"""LightningDiT latent folders (``formats.lightningdit``): safetensors shards of ``latents``,
``latents_flip`` and ``labels`` plus ``latents_stats.pt``, read as the 2N points LightningDiT
trains on, in its units (latent − mean)/std; and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lossfloor.cli import main
from lossfloor.data import load_dataset
from lossfloor.data.dataset import open_items
from lossfloor.errors import UserError


def _folder(path: Path, sizes=(5, 3), c: int = 4, hw: int = 2, stats: bool = True, seed: int = 0):
    """A folder as LightningDiT's extract_features.py writes it (shards named by rank and
    index, float32 latents, int64 labels) and its stats; returns every shard's tensors."""
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    shards = []
    for i, n in enumerate(sizes):
        tensors = {
            "latents": 3 * torch.randn(n, c, hw, hw, generator=g) + 1,
            "latents_flip": 3 * torch.randn(n, c, hw, hw, generator=g) - 1,
            "labels": torch.randint(0, 10, (n,), generator=g),
        }
        save_file(tensors, str(path / f"latents_rank00_shard{i:03d}.safetensors"),
                  metadata={"total_size": str(n)})  # fmt: skip
        shards.append(tensors)
    if stats:
        mean, std = torch.randn(1, c, 1, 1, generator=g), torch.rand(1, c, 1, 1, generator=g)
        torch.save({"mean": mean, "std": std + 0.5}, path / "latents_stats.pt")
    return shards


def _lightningdit_units(path: Path, t: torch.Tensor) -> torch.Tensor:
    """ImgLatentDataset.__getitem__'s arithmetic, written out: (feature − mean)/std·1.0."""
    stats = torch.load(path / "latents_stats.pt")
    return (t - stats["mean"]) / stats["std"] * 1.0


def test_a_folder_reads_as_every_latent_then_every_flip_in_lightningdit_units(tmp_path):
    folder = tmp_path / "latents"
    shards = _folder(folder)
    ds = load_dataset(str(folder))
    latents = torch.cat([s["latents"] for s in shards])
    flips = torch.cat([s["latents_flip"] for s in shards])
    expect = _lightningdit_units(folder, torch.cat([latents, flips]))
    assert torch.equal(ds.x, expect)
    labels = torch.cat([s["labels"] for s in shards])
    assert torch.equal(ds.labels, torch.cat([labels, labels]))
    assert ds.std is None and ds.xflip and ds.n == 16


def test_limit_takes_the_first_images_across_shards_and_their_flips(tmp_path):
    folder = tmp_path / "latents"
    shards = _folder(folder)
    ds = load_dataset(str(folder), limit=6)
    latents = torch.cat([shards[0]["latents"], shards[1]["latents"][:1]])
    flips = torch.cat([shards[0]["latents_flip"], shards[1]["latents_flip"][:1]])
    assert torch.equal(ds.x, _lightningdit_units(folder, torch.cat([latents, flips])))


def test_raw_and_a_given_scale_use_the_stored_latents(tmp_path):
    folder = tmp_path / "latents"
    shards = _folder(folder, stats=False)
    both = torch.cat([shards[0]["latents"], shards[1]["latents"],
                      shards[0]["latents_flip"], shards[1]["latents_flip"]])  # fmt: skip
    assert torch.equal(load_dataset(str(folder), encoder="raw").x, both)
    scaled = load_dataset(str(folder), latent_scale=[0.5], latent_bias=[1.0]).x
    assert torch.equal(scaled, both * np.float32(0.5) + np.float32(1.0))


def test_bfloat16_latents_are_read_as_float32(tmp_path):
    folder = tmp_path / "latents"
    folder.mkdir()
    t = torch.randn(3, 2, 2, 2).bfloat16()
    labels = torch.zeros(3, dtype=torch.int64)
    save_file({"latents": t, "latents_flip": t.clone(), "labels": labels}, str(folder / "a.st"))
    (folder / "a.st").rename(folder / "a.safetensors")
    ds = load_dataset(str(folder), encoder="raw")
    assert ds.x.dtype == torch.float32 and torch.equal(ds.x[:3], t.float())


def test_the_cli_describes_and_estimates_a_latent_folder(tmp_path, capsys):
    folder = tmp_path / "latents"
    _folder(folder, sizes=(8,))
    assert main(["data", "--data", str(folder)]) == 0
    assert "16" in capsys.readouterr().out
    out = tmp_path / "curve.json"
    code = main(["estimate", "--data", str(folder), "--sigmas", "0.5,5", "--out", str(out),
                 "--outer", "64"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


def _one_line_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lossfloor: error: "), err
    return err


@pytest.mark.parametrize(
    ("setup", "options", "message"),
    [
        ("no-stats", [], "no latents_stats.pt"),
        ("ok", ["--xflip"], "mirrored latent already"),
        ("ok", ["--key", "latents"], "applies only to .npz"),
        ("ok", ["--encoder", "lightningdit", "--latent-scale", "2"], "not both"),
        ("ok", ["--encoder", "sd-vae"], "give one value or 3"),
        ("missing-key", [], "no tensor 'labels'"),
        ("bad-stats", [], "not LightningDiT's statistics"),
        ("mismatch", [], "do not match"),
    ],
)
def test_bad_latent_folders_are_refused_in_one_line(tmp_path, capsys, setup, options, message):
    folder = tmp_path / "latents"
    _folder(folder, c=3, stats=setup != "no-stats")
    if setup == "missing-key":
        save_file({"latents": torch.zeros(1, 3, 2, 2), "latents_flip": torch.zeros(1, 3, 2, 2)},
                  str(folder / "z.safetensors"))  # fmt: skip
    if setup == "bad-stats":
        torch.save({"mu": torch.zeros(3)}, folder / "latents_stats.pt")
    if setup == "mismatch":
        bad = {"latents": torch.zeros(2, 3, 2, 2), "latents_flip": torch.zeros(1, 3, 2, 2)}
        save_file({**bad, "labels": torch.zeros(2, dtype=torch.int64)}, str(folder / "z.st"))
        (folder / "z.st").rename(folder / "z.safetensors")
    assert message in _one_line_error(capsys, "data", "--data", str(folder), *options)


def test_an_encoder_lightningdit_elsewhere_is_refused(tmp_path):
    np.savez(tmp_path / "g.npz", mean=np.zeros((2, 3), np.float32), std=np.ones((2, 3), np.float32))
    with pytest.raises(UserError, match="only to LightningDiT latent folders"):
        load_dataset(str(tmp_path / "g.npz"), encoder="lightningdit")


def test_a_latent_folder_does_not_stream(tmp_path):
    folder = tmp_path / "latents"
    _folder(folder)
    with pytest.raises(UserError, match="read whole"):
        open_items(str(folder))
