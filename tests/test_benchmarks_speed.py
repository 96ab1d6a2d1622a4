"""``python -m net2grow.benchmarks speed --quick``: runs, writes positive times and the ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from net2grow.benchmarks import __main__ as cli
from net2grow.benchmarks import speed
from net2grow.benchmarks.__main__ import parse_args


def test_speed_quick_writes_results(tmp_path: Path) -> None:
    args = parse_args([
        "speed", "--quick", "--device", "cpu", "--threads", "1",
        "--out-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"),
    ])
    out = speed.run(args)
    assert out["errors"] == []
    doc = json.loads((tmp_path / "results" / "speed.json").read_text())
    assert doc["name"] == "speed" and doc["machine"]["torch"]
    assert "widen/clone" in doc["columns"]
    rows = doc["rows"]
    assert {r["model"] for r in rows} == {"mlp", "cnn", "resnet18"}
    assert {r["size"] for r in rows if r["model"] != "resnet18"} == {"1M"}
    for r in rows:
        assert r["device"] == "cpu" and 500_000 < r["params"] < 20_000_000
        for key in ("clone_ms", "forward_ms", "trace_ms", "widen_ms", "widen_verify_ms"):
            assert r[key] > 0, key
        assert r["widen/clone"] > 0
        assert r["widen/clone"] == r["widen_ms"] / r["clone_ms"]
        assert r["params_after_widen"] > r["params"]
        assert r["max_err"] < 1e-4
        assert r["deepen_ms"] > 0 and r["deepen_verify_ms"] > 0, r.get("notes")
    assert (tmp_path / "results" / "speed.md").read_text().startswith("# speed")
    assert (tmp_path / "results" / "speed.png").stat().st_size > 0
    assert any((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert "widen/clone" in out["table"]


def test_model_sizes_hit_their_targets() -> None:
    for size, target in speed.SIZES.items():
        h = speed._width_for(target, speed.mlp_params)
        c = speed._width_for(target, speed.cnn_params)
        assert abs(speed.mlp_params(h) / target - 1) < 0.01, size
        assert abs(speed.cnn_params(c) / target - 1) < 0.01, size
    net = speed.make_cnn(8)
    assert sum(p.numel() for p in net.parameters()) == speed.cnn_params(8)
    net = speed.make_mlp(8)
    assert sum(p.numel() for p in net.parameters()) == speed.mlp_params(8)


def test_cli_help_lists_commands(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(c in text for c in ("continual", "net2net", "speed"))


def test_broken_command_does_not_break_the_others(capsys, monkeypatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "missing_cmd", "a command whose module does not exist")
    assert cli.main(["missing_cmd"]) == 2
    assert "missing_cmd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "missing_cmd" in capsys.readouterr().out
    args = parse_args(["speed", "--quick", "--sizes", "10M", "--device", "cpu"])
    assert args.command == "speed" and args.quick and args.sizes == ["10M"]
    assert args.out_dir == "results" and args.runs_dir == "runs" and args.seeds == [0]
