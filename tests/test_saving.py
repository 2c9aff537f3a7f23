"""One persistence scheme: results with records round-trip, and a damaged field is named with its file."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from helpers import make_model
from reslens._inputs import pad_ids
from reslens.lens import LensStats, lens_stats
from reslens.residuals import Residuals
from reslens.hooks import capture


@pytest.fixture(scope="module")
def stats():
    ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    return lens_stats(make_model(), [pad_ids(ids.tolist())], progress=False)


def _rewrite(path, **changes):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**meta, **changes})


def test_a_result_with_records_round_trips_through_the_one_scheme(stats, tmp_path):
    stats.save(tmp_path / "stats.safetensors")
    back = LensStats.load(tmp_path / "stats.safetensors")
    assert back.layers == stats.layers and back.quantile_levels == stats.quantile_levels
    assert torch.equal(back.mean.entropy, stats.mean.entropy)
    assert torch.equal(back.quantiles.kl_final_layer, stats.quantiles.kl_final_layer)
    assert back.lens_name == stats.lens_name


@pytest.mark.parametrize("field", ["layers", "mean.entropy", "lens_name"])
def test_a_malformed_metadata_field_names_the_file_and_the_field(stats, tmp_path, field):
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    if field == "mean.entropy":  # a tensor field: drop it, so the record cannot be rebuilt
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        del tensors[field]
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match=rf"{path.name}.*inconsistent LensStats.*entropy"):
            LensStats.load(path)
        return
    _rewrite(path, **{field: "[0, 1"})
    with pytest.raises(ValueError, match=rf"{path.name}.*metadata field '{field}' is not valid JSON"):
        LensStats.load(path)


def test_a_plain_result_names_its_malformed_field_too(tmp_path):
    res = capture(make_model(), torch.tensor([[1, 2, 3]]), sites=("resid",))
    path = tmp_path / "res.safetensors"
    res.save(path)
    with safe_open(str(path), framework="pt") as f:
        names = [k for k in f.metadata() if k != "format"]
    assert names, "Residuals keeps some fields in the metadata"
    _rewrite(path, **{names[0]: "{"})
    with pytest.raises(ValueError, match=rf"{path.name}.*metadata field '{names[0]}'"):
        Residuals.load(path)
