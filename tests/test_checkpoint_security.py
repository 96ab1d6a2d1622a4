"""A checkpoint file is untrusted: crafted files must be refused before anything they name runs.

Each test forges a file with a valid header and checksum (anyone can recompute them) around a
payload that tries one class of gadget: attribute chains, method calls, unlisted functions, code
injected through names the graph compiles, hostile module trees, oversized intermediates. A
hypothesis fuzzer mutates graph entries at random with values drawn from the same gadgets.
"""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthError, load, load_checkpoint, save
from net2grow.growth.checkpoint.fileformat import read_payload, write_payload

REPO = pathlib.Path(__file__).resolve().parents[1]


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(x)).reshape(x.shape[0], -1)


@pytest.fixture(scope="module")
def clean_payload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clean") / "small.n2g"
    save(GrowableNetwork(Small(), torch.randn(2, 4)), path)
    return read_payload(path)


def _write(tmp_path: pathlib.Path, payload: dict[str, Any]) -> pathlib.Path:
    path = tmp_path / "forged.n2g"
    write_payload(payload, path)
    return path


def _forged(
    tmp_path: pathlib.Path, clean: dict[str, Any], edit: Callable[[dict[str, Any]], None]
) -> pathlib.Path:
    payload = copy.deepcopy(clean)
    edit(payload)
    return _write(tmp_path, payload)


def _node(op: str, name: str, target: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {
        "op": op,
        "name": name,
        "target": target,
        "args": list(args),
        "kwargs": {"dict": [[k, v] for k, v in kwargs.items()]},
    }


def _ref(name: str) -> dict[str, str]:
    return {"node": name}


def _graph(*body: dict[str, Any], out: str) -> list[dict[str, Any]]:
    return [
        _node("placeholder", "x", "x"),
        *body,
        _node("output", "output", "output", _ref(out)),
    ]


def _set_graph(graph: list[dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    def edit(payload: dict[str, Any]) -> None:
        payload["graph"] = graph

    return edit


class _Tripwire:
    """Replaces functions a gadget would end in; records any call instead of running it."""

    TARGETS: ClassVar = [
        (os, "_exit"),
        (os, "system"),
        (os, "kill"),
        (os, "umask"),
        (subprocess, "Popen"),
    ]

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for owner, name in self.TARGETS:
            monkeypatch.setattr(owner, name, self._recorder(f"{owner.__name__}.{name}"))

    def _recorder(self, label: str) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append(label)

        return record


# --------------------------------------------------------------------------------------------
# the reported exploit, end to end in a fresh process
# --------------------------------------------------------------------------------------------

EXPLOIT_CHAIN = _graph(
    _node("call_function", "cls", "builtins.getattr", _ref("x"), "__class__"),
    _node("call_function", "bwd", "builtins.getattr", _ref("cls"), "backward"),
    _node("call_function", "glb", "builtins.getattr", _ref("bwd"), "__globals__"),
    _node("call_function", "trc", "operator.getitem", _ref("glb"), "torch"),
    _node("call_function", "osm", "builtins.getattr", _ref("trc"), "os"),
    _node("call_function", "ext", "builtins.getattr", _ref("osm"), "_exit"),
    _node("call_method", "v", "new_tensor", _ref("x"), [42], dtype={"dtype": "int64"}),
    _node("call_method", "boom", "apply_", _ref("v"), _ref("ext")),
    out="boom",
)


def test_reported_exploit_is_refused_in_a_fresh_process(
    clean_payload: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    path = _forged(tmp_path, clean_payload, _set_graph(EXPLOIT_CHAIN))
    code = textwrap.dedent(
        f"""
        from net2grow import growth
        try:
            growth.load({str(path)!r})
        except growth.GrowthError as exc:
            print("REFUSED:", exc)
        else:
            print("LOADED")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr  # 42 would mean os._exit ran
    assert "REFUSED:" in proc.stdout and "__class__" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------------
# one test per gadget class
# --------------------------------------------------------------------------------------------

GADGETS: dict[str, tuple[list[dict[str, Any]], str]] = {
    "dunder getattr": (
        _graph(_node("call_function", "a", "builtins.getattr", _ref("x"), "__class__"), out="a"),
        "getattr reads only",
    ),
    "private getattr": (
        _graph(_node("call_function", "a", "builtins.getattr", _ref("x"), "_version"), out="a"),
        "getattr reads only",
    ),
    "getattr on a constant": (
        _graph(_node("call_function", "a", "builtins.getattr", "text", "shape"), out="a"),
        "getattr reads only",
    ),
    "getattr with a default": (
        _graph(_node("call_function", "a", "builtins.getattr", _ref("x"), "shape", 1), out="a"),
        "getattr reads only",
    ),
    "getitem on a constant dict": (
        _graph(_node("call_function", "a", "operator.getitem", {"dict": [["k", 1]]}, "k"), out="a"),
        "getitem indexes graph values only",
    ),
    "apply_ method": (
        _graph(_node("call_method", "a", "apply_", _ref("x"), "print"), out="a"),
        "calls method 'apply_'",
    ),
    "new_tensor method": (
        _graph(_node("call_method", "a", "new_tensor", _ref("x"), [42]), out="a"),
        "calls method 'new_tensor'",
    ),
    "register_hook method": (
        _graph(_node("call_method", "a", "register_hook", _ref("x"), "print"), out="a"),
        "calls method 'register_hook'",
    ),
    "type method (imports by name)": (
        _graph(_node("call_method", "a", "type", _ref("x"), "os.system"), out="a"),
        "calls method 'type'",
    ),
    "untyped_storage method": (
        _graph(_node("call_method", "a", "untyped_storage", _ref("x")), out="a"),
        "calls method 'untyped_storage'",
    ),
    "dunder method": (
        _graph(_node("call_method", "a", "__reduce_ex__", _ref("x"), 2), out="a"),
        "calls method '__reduce_ex__'",
    ),
    "method on a constant": (
        _graph(_node("call_method", "a", "split", "a b", " "), out="a"),
        "methods are called on graph values only",
    ),
    "eval": (_graph(_node("call_function", "a", "builtins.eval", "1"), out="a"), "builtins.eval"),
    "exec": (_graph(_node("call_function", "a", "builtins.exec", "1"), out="a"), "builtins.exec"),
    "import": (
        _graph(_node("call_function", "a", "builtins.__import__", "os"), out="a"),
        "__import__",
    ),
    "os.system": (_graph(_node("call_function", "a", "os.system", "true"), out="a"), "os.system"),
    "torch.load": (_graph(_node("call_function", "a", "torch.load", "f"), out="a"), "torch.load"),
    "attrgetter": (
        _graph(_node("call_function", "a", "operator.attrgetter", "__class__"), out="a"),
        "operator.attrgetter",
    ),
    "private torch function": (
        _graph(_node("call_function", "a", "torch._C._nn.linear", _ref("x")), out="a"),
        "torch._C._nn.linear",
    ),
    "injection through a method name": (
        _graph(
            _node("call_method", "a", 'relu")+__import__("os")._exit(42)+("', _ref("x")), out="a"
        ),
        "calls method",
    ),
    "injection through a module target": (
        _graph(_node("call_module", "a", 'fc")._exit(42)#', _ref("x")), out="a"),
        "module name",
    ),
    "injection through an attribute target": (
        _graph(_node("get_attr", "a", "fc.__class__.__init__.__globals__"), out="a"),
        "attribute name",
    ),
    "injection through an input name": (
        [
            _node("placeholder", "x", "x=__import__('os')._exit(42)"),
            _node("output", "output", "output", _ref("x")),
        ],
        "input",
    ),
    "injection through a node name": (
        _graph(_node("call_function", "a)or os._exit(42", "torch.relu", _ref("x")), out="x"),
        "graph node name",
    ),
    "injection through a keyword": (
        _graph(
            _node("call_function", "a", "torch.relu", _ref("x"), **{"x)or os._exit(42)#": 1}),
            out="a",
        ),
        "keyword argument name",
    ),
    "oversized intermediate": (
        _graph(_node("call_method", "a", "expand", _ref("x"), 1 << 20, 1 << 20, 2, 4), out="a"),
        "MAX_PROBE_ELEMENTS",
    ),
    "dtype by arbitrary name": (
        _graph(_node("call_method", "a", "to", _ref("x"), {"dtype": "__builtins__"}), out="a"),
        "cannot decode",
    ),
    "device with a payload": (
        _graph(_node("call_method", "a", "to", _ref("x"), {"device": "cpu;rm -rf /"}), out="a"),
        "cannot decode",
    ),
}


@pytest.mark.parametrize("gadget", list(GADGETS))
def test_graph_gadget_is_refused_before_it_runs(
    gadget: str,
    clean_payload: dict[str, Any],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graph, message = GADGETS[gadget]
    path = _forged(tmp_path, clean_payload, _set_graph(graph))
    tripwire = _Tripwire(monkeypatch)
    tracemalloc.start()
    try:
        with pytest.raises(GrowthError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tripwire.calls == []
    assert peak < 64 << 20  # nothing large was allocated on the way to the refusal


def _module_entry(payload: dict[str, Any], path: str) -> dict[str, Any]:
    return next(e for e in payload["modules"] if e["path"] == path)


def _rename_module(payload: dict[str, Any], new: str) -> None:
    _module_entry(payload, "fc")["path"] = new


def _tensor_named(payload: dict[str, Any], new: str) -> None:
    _module_entry(payload, "")["tensors"].append(
        {"name": new, "parameter": False, "requires_grad": False, "persistent": True, "tie": None}
    )
    payload["tensors"][new] = torch.zeros(1)


TREE_GADGETS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "dunder module path": (lambda p: _rename_module(p, "__class__"), "module name"),
    "module hiding an attribute": (lambda p: _rename_module(p, "forward"), "hides an attribute"),
    "layer type by module path": (
        lambda p: _module_entry(p, "fc").update(type="builtins.eval"),
        "builtins.eval",
    ),
    "unregistered torch layer": (
        lambda p: _module_entry(p, "fc").update(type="TransformerEncoderLayer"),
        "TransformerEncoderLayer",
    ),
    "container of another type": (
        lambda p: p["modules"].append(
            {"path": "c", "kind": "container", "type": "Linear", "training": False, "tensors": []}
        ),
        "container 'c'",
    ),
    "constructor argument outside the spec": (
        lambda p: _module_entry(p, "fc")["args"].update(device="cuda"),
        "bad constructor arguments",
    ),
    "state outside the spec": (
        lambda p: _module_entry(p, "fc").update(state={"forward": 1}),
        "bad state",
    ),
    "alias to an unknown module": (
        lambda p: p["modules"].append({"path": "b", "kind": "alias", "of": "no.such"}),
        "unknown module",
    ),
    "dunder tensor name": (lambda p: _tensor_named(p, "__dict__"), "tensor name"),
    "tensor hiding a method": (lambda p: _tensor_named(p, "forward"), "hides an attribute"),
    "tensor of the wrong shape": (
        lambda p: p["tensors"].update({"fc.weight": torch.zeros(3, 5)}),
        "shape",
    ),
    "tensor tied to nothing": (
        lambda p: _module_entry(p, "fc")["tensors"][0].update(tie="elsewhere"),
        "tied to unknown",
    ),
    "dunder attribute": (
        lambda p: p["attributes"].update({"fc.__class__": torch.zeros(1)}),
        "attribute name",
    ),
    "attribute overriding a member": (
        lambda p: p["attributes"].update({"fc.forward": torch.zeros(1)}),
        "not a new tensor attribute",
    ),
    "non-tensor attribute": (
        lambda p: p["attributes"].update({"fc.extra": "text"}),
        "not a new tensor attribute",
    ),
    "missing model class": (lambda p: p.pop("model_class"), "model class"),
    "optimizer of the wrong type": (lambda p: p.update(optimizer=5), "optimizer is unusable"),
    "empty optimizer": (lambda p: p.update(optimizer={}), "optimizer is unusable"),
    "optimizer naming foreign parameters": (
        lambda p: p.update(
            optimizer={
                "class": "SGD",
                "state_dict": {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]},
                "param_names": [["fc.__class__"]],
            }
        ),
        "optimizer is unusable",
    ),
    "deeply nested value": (
        lambda p: p["graph"][1]["kwargs"]["dict"].append(
            ["deep", [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
        ),
        "nested deeper",
    ),
    "history record of another shape": (
        lambda p: p["history"].append({"op": "widen"}),
        "growth record",
    ),
}


@pytest.mark.parametrize("gadget", list(TREE_GADGETS))
def test_hostile_module_tree_or_metadata_is_refused(
    gadget: str,
    clean_payload: dict[str, Any],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    edit, message = TREE_GADGETS[gadget]
    path = _forged(tmp_path, clean_payload, edit)
    tripwire = _Tripwire(monkeypatch)
    with pytest.raises(GrowthError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(path)
    assert tripwire.calls == []


def test_unchanged_forged_payload_still_loads(
    clean_payload: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    """The forging helpers themselves produce loadable files: refusals above are real."""
    net = load(_forged(tmp_path, clean_payload, lambda p: None))
    x = torch.randn(5, 4)
    assert net(x).shape == (5, 3)


# --------------------------------------------------------------------------------------------
# fuzzer over graph entries
# --------------------------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "__class__", "__globals__", "__reduce__", "__import__", "_exit", "apply_", "new_tensor",
    "register_hook", "type", "os.system", "builtins.eval", "builtins.getattr", "operator.getitem",
    "torch.relu", "torch.load", "fc", "fc.weight", "x", "relu", "reshape", "shape", "output",
    'a")+__import__("os")._exit(3)+("', "x=__import__('os')", "fc.__dict__", "", "0", "*args",
]  # fmt: skip
_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=True),
        st.sampled_from(HOSTILE_STRINGS),
        st.sampled_from(["x", "relu", "fc", "getattr_1", "getitem", "nope"]).map(_ref),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(lambda v: {"tuple": v}),
        st.lists(st.tuples(st.sampled_from(HOSTILE_STRINGS), inner), max_size=2).map(
            lambda kv: {"dict": [list(p) for p in kv]}
        ),
        st.sampled_from(["float32", "__builtins__", "os"]).map(lambda d: {"dtype": d}),
    ),
    max_leaves=8,
)
_mutation = st.tuples(
    st.integers(0, 6),
    st.sampled_from(["op", "name", "target", "args", "kwargs", "insert"]),
    st.sampled_from(["call_function", "call_method", "call_module", "get_attr", "placeholder"]),
    st.sampled_from(HOSTILE_STRINGS),
    _values,
)


@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzzed_graph_entries_load_safely_or_are_refused(
    mutations: list[tuple[int, str, str, str, Any]],
    clean_payload: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    payload = copy.deepcopy(clean_payload)
    graph = payload["graph"]
    for index, field, op, name, value in mutations:
        node = graph[index % len(graph)]
        if field == "op":
            node["op"] = op
        elif field in ("name", "target"):
            node[field] = name
        elif field == "args":
            node["args"] = value if isinstance(value, list) else [value]
        elif field == "kwargs":
            node["kwargs"] = {"dict": [[name, value]]}
        else:
            graph.insert(index % len(graph), _node(op, f"n{index}", name, value))
    path = _write(tmp_path_factory.mktemp("fuzz"), payload)
    calls: list[str] = []
    saved = {(owner, attr): getattr(owner, attr) for owner, attr in _Tripwire.TARGETS}
    try:
        for owner, attr in _Tripwire.TARGETS:
            setattr(owner, attr, lambda *a, _l=f"{attr}", **k: calls.append(_l))
        try:
            net = load(path)
        except GrowthError:
            net = None
        if net is not None:  # a harmless variant may load: it must also run harmlessly
            try:
                with torch.no_grad():
                    net(torch.randn(2, 4))
            except Exception:
                pass
    finally:
        for (owner, attr), fn in saved.items():
            setattr(owner, attr, fn)
    assert calls == []


# --------------------------------------------------------------------------------------------
# the file around the payload
# --------------------------------------------------------------------------------------------


def test_foreign_file_is_refused_from_its_header_alone(tmp_path: pathlib.Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(256 << 20)  # sparse: 256 MiB of zeros
    tracemalloc.start()
    try:
        with pytest.raises(GrowthError, match="not a net2grow checkpoint"):
            load(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_header_declaring_another_length_is_refused_before_the_payload_is_read(
    clean_payload: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    path = _write(tmp_path, clean_payload)
    with open(path, "ab") as f:
        f.truncate(os.path.getsize(path) + (256 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(GrowthError, match="unexpected bytes after the payload"):
            load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_missing_file_is_a_growth_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(GrowthError, match="cannot open checkpoint"):
        load(tmp_path / "absent.n2g")


def test_bad_optimizer_argument_is_refused_before_reading(tmp_path: pathlib.Path) -> None:
    with pytest.raises(GrowthError, match="optimizer must be True, False or"):
        load(tmp_path / "absent.n2g", optimizer="adam")  # type: ignore[call-overload]


def test_load_gives_the_optimizer_back(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    net = GrowableNetwork(Small(), torch.randn(2, 4))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    save(net, tmp_path / "a.n2g", optimizer=opt)
    loaded, loaded_opt = load(tmp_path / "a.n2g", optimizer=True)
    assert isinstance(loaded_opt, torch.optim.Adam)
    params = dict(loaded.named_parameters())
    for name, p in net.named_parameters():
        mine, theirs = opt.state[p], loaded_opt.state[params[name]]
        assert torch.equal(mine["exp_avg"], theirs["exp_avg"])
        assert torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])
    assert load_checkpoint(tmp_path / "a.n2g").optimizer_class == "Adam"
