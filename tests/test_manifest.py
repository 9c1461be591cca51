"""embed --manifest: many finetunes in one resumable job; bad items are listed, never fatal."""

from __future__ import annotations

import json
import shutil

from delta_router import ModelIndex
from delta_router.cli import main
from delta_router.embedding.manifest import read_manifest


def test_manifest_embeds_the_good_items_lists_the_bad_and_resumes(tiny_base, adapters, tmp_path, capsys):
    corrupt = shutil.copytree(adapters[3], tmp_path / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rows = [{"path": str(adapters[i]), "id": f"good-{i}", "tags": {"domain": "math"}} for i in range(3)]
    rows += [
        {"path": str(tmp_path / "missing")},
        {"path": str(corrupt), "id": "corrupt"},
        {"path": str(adapters[0]), "id": "good-0"},  # the same id twice
    ]
    manifest = tmp_path / "zoo.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    idx, failures = tmp_path / "idx", tmp_path / "failed.jsonl"
    argv = ["embed", "--manifest", str(manifest), "--index", str(idx), "--base", str(tiny_base), "--json"]

    assert main([*argv, "--failures", str(failures)]) == 1  # some failed
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["embedded"]) == ["good-0", "good-1", "good-2"]
    failed = [json.loads(line) for line in failures.read_text().splitlines()]
    assert [f["line"].rsplit(":", 1)[1] for f in failed] == ["4", "5", "6"]
    assert "not a directory" in failed[0]["reason"] and "corrupt" in failed[1]["reason"]
    assert "repeats" in failed[2]["reason"]
    index = ModelIndex.load(idx)
    assert len(index) == 3 and index.get("good-1").tags == {"domain": "math"}

    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert main(argv) == 0  # resumed: everything is indexed already
    assert json.loads(capsys.readouterr().out)["skipped"] == ["good-0", "good-1", "good-2"]


def test_manifest_formats_and_malformed_lines(adapters, tmp_path):
    csv_file = tmp_path / "zoo.csv"
    csv_file.write_text(f"path,id,domain\n{adapters[0]},a,math\n{adapters[1]},,law\n")
    items = read_manifest(csv_file)
    assert [(i.model_id, i.tags) for i in items] == [("a", {"domain": "math"}), (None, {"domain": "law"})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "x"}\n{"id": "no-path"}\n')
    assert main(["embed", "--manifest", str(bad)]) == 2


def test_manifest_on_ray_gives_the_single_process_vectors(tiny_base, adapters, tmp_path, capsys):
    """Ray Data on a local 2-CPU Ray: an actor pool with fractional CPUs, the same vectors."""
    import numpy as np
    import pytest

    ray = pytest.importorskip("ray")
    corrupt = shutil.copytree(adapters[3], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    rows = [{"path": str(a), "id": f"m{i}"} for i, a in enumerate(adapters)] + [{"path": str(corrupt)}]
    manifest = tmp_path / "zoo.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["embed", "--manifest", str(manifest), "--base", str(tiny_base), "--json"]
    assert main([*common, "--index", str(tmp_path / "local")]) == 1  # the corrupt one fails
    capsys.readouterr()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        argv = [*common, "--index", str(tmp_path / "on-ray"), "--ray", "--ray-workers", "2"]
        assert main(argv) == 1
        out = json.loads(capsys.readouterr().out)
    finally:
        ray.shutdown()
    assert sorted(out["embedded"]) == ["m0", "m1", "m2", "m3"] and len(out["failed"]) == 1
    local, on_ray = ModelIndex.load(tmp_path / "local"), ModelIndex.load(tmp_path / "on-ray")
    for model_id in out["embedded"]:
        a, b = local.get(model_id).embedding.vector, on_ray.get(model_id).embedding.vector
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
