"""Tuned launch configurations: which block sizes, warps and stages a conv's
kernels launch with, per layer shape and device.

The launchers in kernels/conv.py's TUNABLE take a config and know nothing
of this table; `launchers()` wraps each (`tunable`) so that it looks its
configuration up here before each launch, keyed by the kernel's source (its
name left out, so equal layers of other networks share an entry), the shapes,
layouts and dtypes of its tensors, and the fusion flags that change the
compiled kernel.  No entry: the launcher's own defaults.  Entries come from
`netdsl tune` (tune.py), which times candidates on the GPU and saves the
fastest in a JSON file beside the module cache, so a second run starts with
them; a generated module compiled with `--tuned` carries its own table
(`register`), used where this machine has tuned nothing newer.

NETDSL_TUNED=0 ignores every table (to compare against the defaults).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import threading
import warnings
from pathlib import Path

import torch

_lock = threading.Lock()
# the tuner's recorder while it runs a step: global, not per thread, because
# autograd runs a CUDA backward on a thread of its own
_recorder = None

# device tag -> site key -> entry {"config": {...}, ...}; disk entries win over registered ones
_registered: dict[str, dict[str, dict]] = {}
_disk: dict[str, dict[str, dict]] | None = None
_memo: dict = {}
_hashes: dict = {}

# what a config may set, and the values each may take
_BLOCKS = {"BLOCK_M", "BLOCK_N", "BLOCK_K"}
_LIMITS = {"num_warps": (1, 2, 4, 8, 16), "num_stages": range(1, 9), "STAGES": range(1, 9),
           "SPLIT": range(1, 65536), "WGRAD_ADD": (0, 1)}


def file_path() -> Path:
    from .cache import cache_dir

    return cache_dir().parent / "tuning.json"


def enabled() -> bool:
    return os.environ.get("NETDSL_TUNED", "1") != "0"


def device_tag(device) -> str:
    """The name entries are filed under: the GPU's name and architecture ("cpu" for the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def kernel_hash(kernel) -> str:
    """The kernel's source, its name left out: layers with equal geometry and
    fusion compile the same code under other names (and in other networks)."""
    entry = _hashes.get(id(kernel))
    if entry is None or entry[0] is not kernel:
        src = re.sub(r"^def\s+\w+", "def _", kernel.src, count=1, flags=re.M)
        entry = _hashes[id(kernel)] = (kernel, hashlib.sha256(src.encode()).hexdigest()[:16])
    return entry[1]


_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _layout(t) -> str:
    if t.is_contiguous(memory_format=torch.channels_last) and t.dim() == 4:
        return "cl"
    return "c" if t.is_contiguous() else "s"


def site_key(kind: str, kernel, tensors, flags) -> str:
    shapes = ",".join("x".join(map(str, t.shape)) + f":{_layout(t)}:{_DT.get(t.dtype, str(t.dtype))}"
                      for t in tensors if t is not None)
    return f"{kind}|{kernel_hash(kernel)}|{shapes}|{flags}"


def valid(config) -> bool:
    """A config as a file may hold it: known names, powers of two for blocks."""
    if not isinstance(config, dict):
        return False
    for name, v in config.items():
        base = name[2:] if name[:2] in ("d_", "w_") else name
        if not isinstance(v, int) or isinstance(v, bool):
            return False
        if base in _BLOCKS:
            if v < 1 or v > 1024 or v & (v - 1):
                return False
        elif base in _LIMITS:
            if v not in _LIMITS[base]:
                return False
        else:
            return False
    return True


def _load_disk() -> dict:
    global _disk
    if _disk is None:
        path, table = file_path(), {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
                for tag, entries in data.get("devices", {}).items():
                    table[tag] = {k: e for k, e in entries.items() if valid(e.get("config"))}
            except (ValueError, AttributeError, TypeError) as e:
                warnings.warn(f"netdsl: ignoring the tuning file {path}: {e}", stacklevel=2)
                table = {}
        _disk = table
    return _disk


def entry(tag: str, key: str) -> dict | None:
    e = _load_disk().get(tag, {}).get(key)
    return e if e is not None else _registered.get(tag, {}).get(key)


def entries(tag: str | None = None) -> dict[str, dict[str, dict]]:
    """Every known entry (disk over registered), by device tag."""
    out: dict[str, dict[str, dict]] = {}
    for src in (_registered, _load_disk()):
        for t, es in src.items():
            if tag is None or t == tag:
                out.setdefault(t, {}).update(es)
    return out


def register(table: dict) -> None:
    """A generated module's baked-in entries ({device tag: {site key: entry}})."""
    with _lock:
        for tag, es in table.items():
            _registered.setdefault(tag, {}).update({k: e for k, e in es.items() if valid(e.get("config"))})
        _memo.clear()


def bake(path) -> dict[str, dict[str, dict]]:
    """Append to the generated module at path a table of every known entry
    for its kernels (every device), registered when it is imported."""
    from triton.runtime.jit import JITFunction

    from .cache import import_file

    path = Path(path)
    mod = import_file(path, f"netdsl_bake_{os.getpid()}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}")
    mine = {kernel_hash(k) for k in vars(mod).values() if isinstance(k, JITFunction)}
    table = {}
    for tag, es in entries().items():
        keep = {k: e for k, e in es.items() if k.split("|")[1] in mine}
        if keep:
            table[tag] = keep
    if table:
        lines = ["rt.register_tuned({"]
        for tag, es in sorted(table.items()):
            lines.append(f"    {tag!r}: {{")
            for key, e in sorted(es.items()):
                kept = {k: e[k] for k in ("config", "ms", "default_ms", "kernel", "triton") if k in e}
                lines.append(f"        {key!r}:\n            {kept!r},")
            lines.append("    },")
        lines.append("})")
        with open(path, "a") as f:
            f.write("\n\n# Launch configurations `netdsl tune` measured for these kernels (device -> kernel,\n"
                    "# shapes and fusion -> config, milliseconds), baked in by `netdsl compile --tuned`; where\n"
                    "# this machine's own tuning file has an entry too, that one is used.\n"
                    + "\n".join(lines) + "\n")
    return table


def store(tag: str, new: dict[str, dict]) -> Path:
    """Add entries to the tuning file (merged with what is there: another
    process may have tuned other shapes meanwhile) and to this process."""
    global _disk
    path = file_path()
    with _lock:
        data = {"version": 1, "devices": {}}
        if path.exists():
            try:
                data = json.loads(path.read_text())
                data.setdefault("devices", {})
            except ValueError:
                pass
        data["devices"].setdefault(tag, {}).update(new)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
        _disk = None
        _memo.clear()
    return path


def forget() -> None:
    """Drop what this process has read or registered (tests; after the file changed)."""
    global _disk
    with _lock:
        _disk = None
        _registered.clear()
        _memo.clear()


# ------------------------------------------------------------------ launchers


def launchers():
    """The tunable launchers of kernels/conv.py, each looking its configuration
    up here (the runtime launches these)."""
    from types import SimpleNamespace

    from .kernels import conv as kconv

    return SimpleNamespace(**{fn.__name__: tunable(kind, site)(fn) for kind, (fn, site) in kconv.TUNABLE.items()})


def tunable(kind: str, site):
    """Marks a launcher `fn(rt, kernel, *args, config=None, **kwargs)` as
    tunable.  site(*args, **kwargs) -> (tensors, flags): what besides the
    kernel decides its configuration.  A call without config gets the tuned
    one (or {} for the defaults); inside `recording()`, each site's first
    call is kept for the tuner."""
    def wrap(fn):
        @functools.wraps(fn)
        def launcher(rt, kernel, *args, config=None, **kwargs):
            if config is None:
                config = _lookup(kind, launcher, rt, kernel, site, args, kwargs)
            return fn(rt, kernel, *args, config=config, **kwargs)

        launcher.kind = kind
        return launcher

    return wrap


def _lookup(kind, launcher, rt, kernel, site, args, kwargs) -> dict:
    rec = _recorder
    if (not enabled() and rec is None) or rt.shapes_only():  # (a trace's shapes: sizes may be symbolic)
        return {}
    tensors, flags = site(*args, **kwargs)
    memo = (id(kernel), kind, tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors if t is not None),
            flags)
    hit = _memo.get(memo)
    if hit is None or hit[0] is not kernel:
        key = site_key(kind, kernel, tensors, flags)
        e = entry(device_tag(tensors[0].device), key)
        hit = _memo[memo] = (kernel, key, dict(e["config"]) if e is not None else None)
    _, key, config = hit
    if rec is not None:
        rec.see(kind, key, config, launcher, rt, kernel, args, kwargs)
    return dict(config) if config is not None and enabled() else {}


class Site:
    """A tunable launch as one training step made it, its inputs copied
    before it ran (tune.py launches it again, with other configs)."""

    def __init__(self, kind, key, config, launcher, rt, kernel, args, kwargs):
        self.kind, self.key, self.tuned = kind, key, config
        self.launcher, self.rt, self.kernel = launcher, rt, kernel
        self.args, self.kwargs = clone(args), clone(kwargs)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def shapes(self) -> str:
        return self.key.split("|")[2]

    def call(self, config, args=None, **extra):
        args, kwargs = args if args is not None else (self.args, self.kwargs)
        return self.launcher(self.rt, self.kernel, *args, config=config, **kwargs, **extra)


class Recorder:
    def __init__(self):
        self.sites: dict[str, Site] = {}

    def see(self, kind, key, config, launcher, rt, kernel, args, kwargs):
        with _lock:
            if key not in self.sites:
                self.sites[key] = Site(kind, key, config, launcher, rt, kernel, args, kwargs)


@contextlib.contextmanager
def recording():
    """Keep the first call of every tunable site launched inside the block
    (in any thread: a CUDA backward runs on autograd's)."""
    global _recorder
    _recorder = rec = Recorder()
    try:
        yield rec
    finally:
        _recorder = None


def clone(v):
    """A copy of a launcher's arguments whose tensors are new (same strides):
    launching again must not touch the step's own tensors or modules."""
    if isinstance(v, torch.Tensor):
        if 0 in v.stride():  # (broadcast views: empty_strided would overlap)
            return v.detach().clone()
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v.detach())
    if isinstance(v, torch.nn.Module):
        import copy

        return copy.deepcopy(v)
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v)(*(clone(x) for x in v))
    if isinstance(v, (tuple, list)):
        return type(v)(clone(x) for x in v)
    if isinstance(v, dict):
        return {k: clone(x) for k, x in v.items()}
    return v
