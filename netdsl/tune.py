"""`netdsl tune`: time candidate launch configurations of every conv kernel a
network launches in one training step (or inference), on the GPU, and keep
the fastest per layer shape (tuning.py files them and the launchers use them).

How, per site (a kernel with its tensor shapes and fusion flags):
1. one step runs with recording on; each site's first launch keeps copies of
   its inputs (tuning.Site), and the module's state is restored afterwards;
2. every site's default configuration is timed, and sites are tuned from the
   slowest down (so a time budget goes where it pays);
3. a conv forward tries each candidate of CONV; a conv's backward launch (its
   dgrad and wgrad in one grid) tunes the dgrad part alone over DGRAD, the
   wgrad part alone over WGRAD (then, where its pixels are split, half and
   twice the chunks), then both together at each of WARPS;
4. the fastest candidate must give what the default gives (every tensor it
   writes, within the precision's tolerance) or the next one is taken: block
   sizes change the grid-wide merges, so a config is checked, not trusted;
5. the winners (or "defaults", where nothing beat them) are saved.

Triton's own `triton.autotune` does not fit these launchers: the grid, the
partial-sum buffers and the merge counters are sized from the block sizes
before the launch, and the tile size travels on to the next kernel.

Timing uses `triton.testing.do_bench` (CUDA events, median).  Without a GPU
`tune()` needs a timer passed in (the tests pass one); `netdsl tune` refuses.
"""
from __future__ import annotations

import datetime
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import parallel_compile, tuning
from . import runtime as rt
from .kernels import conv as kconv
from .kernels.conv import _pow2

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a conv forward: output pixels × output channels × input
# channels; Triton's matmul tutorial's and Inductor's conv template's shapes, for channels_last implicit GEMM
CONV = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 64, 8, 3),
        (64, 64, 64, 4, 3), (64, 64, 32, 4, 4), (256, 64, 32, 8, 3), (32, 64, 32, 4, 4)]
# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES) of a dgrad (a transposed conv: input pixels × input channels × output channels)
DGRAD = [(128, 64, 32, 3), (64, 128, 32, 3), (128, 128, 32, 3), (64, 64, 64, 3), (64, 64, 32, 4), (128, 64, 64, 2)]
# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES) of a wgrad: output channels × input channels × pixels
WGRAD = [(64, 64, 64, 2), (128, 64, 32, 2), (64, 128, 32, 2), (128, 128, 32, 2), (64, 64, 32, 3), (64, 64, 128, 2)]
WARPS = (4, 8)


class TuneError(Exception):
    """Tuning cannot run here (no GPU and no timer)."""


@dataclass
class Result:
    kind: str
    kernel: str
    shapes: str
    default_ms: float | None = None
    best_ms: float | None = None
    config: dict | None = None  # {} where the defaults stayed fastest; None where not tuned
    tried: int = 0
    rejected: list = field(default_factory=list)  # (config, why)
    note: str = ""

    @property
    def speedup(self):
        return self.default_ms / self.best_ms if self.default_ms and self.best_ms else None


def gpu_timer(fn) -> float:
    """Median milliseconds of fn on the GPU (CUDA events, after warm-up)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def _dims(site):
    """(pixels, output channels per group, input channels per group) of the
    site's launch: for a conv's backward, of the conv (pixels of its input)."""
    a, _, b = site.args[:3]
    g = site.kwargs.get("groups", 1)
    if site.kind == "conv_wgrad":  # (dy, x, dw)
        return a.shape[0] * a.shape[2] * a.shape[3], a.shape[1] // g, site.args[1].shape[1] // g
    if site.kind == "conv_backward":  # (dy, weight, x)
        return b.shape[0] * b.shape[2] * b.shape[3], a.shape[1] // g, b.shape[1] // g
    return b.shape[0] * b.shape[2] * b.shape[3], b.shape[1] // g, a.shape[1] // g  # (x, weight, out)


def candidates(site) -> list[dict]:
    """The configs worth timing for this site: the tables above, each block
    size capped at what the problem fills (never below tl.dot's 16), deduplicated."""
    M, cout_g, cin_g = _dims(site)
    out, seen = [], set()

    def add(c):
        k = tuple(sorted(c.items()))
        if k not in seen:
            seen.add(k)
            out.append(c)

    if site.kind == "conv":
        for bm, bn, bk, w, s in CONV:
            add(dict(BLOCK_M=_pow2(M, 16, bm), BLOCK_N=_pow2(cout_g, 16, bn), BLOCK_K=_pow2(cin_g, 16, bk),
                     num_warps=w, num_stages=s))
    elif site.kind == "conv_transpose":  # a transposed conv layer: dgrad-shaped
        for bm, bn, bk, s in DGRAD:
            add(dict(BLOCK_M=_pow2(M, 16, bm), BLOCK_N=_pow2(cout_g, 16, bn), BLOCK_K=_pow2(cin_g, 16, bk), STAGES=s))
    elif site.kind == "conv_wgrad":
        for bm, bn, bk, s in WGRAD:
            add(dict(BLOCK_M=_pow2(cout_g, 16, bm), BLOCK_N=_pow2(cin_g, 16, bn), BLOCK_K=_pow2(M, 16, bk), STAGES=s))
    return out


def part_candidates(site, part: str) -> list[dict]:
    """A conv backward's candidates for one part ("d": the dgrad, over the
    input's pixels and channels; "w": the wgrad), names prefixed."""
    M_in, cout_g, cin_g = _dims(site)
    dy = site.args[0]
    M_out = dy.shape[0] * dy.shape[2] * dy.shape[3]
    out, seen = [], set()
    for bm, bn, bk, s in DGRAD if part == "d" else WGRAD:
        if part == "d":
            c = dict(BLOCK_M=_pow2(M_in, 16, bm), BLOCK_N=_pow2(cin_g, 16, bn), BLOCK_K=_pow2(cout_g, 16, bk), STAGES=s)
        else:
            c = dict(BLOCK_M=_pow2(cout_g, 16, bm), BLOCK_N=_pow2(cin_g, 16, bn), BLOCK_K=_pow2(M_out, 16, bk),
                     STAGES=s)
        c = {f"{part}_{k}": v for k, v in c.items()}
        if tuple(sorted(c.items())) not in seen:
            seen.add(tuple(sorted(c.items())))
            out.append(c)
    return out


def split_candidates(site, config: dict, prefix: str) -> list[dict]:
    """config (a wgrad's, names prefixed) with half and twice the chunks the
    launcher's heuristic would split its pixels into (kernels/conv.py's
    wgrad_split), where it splits at all."""
    from .kernels.conv import wgrad_split

    dy = site.args[0]
    dw = site.args[2] if site.kind == "conv_wgrad" else site.args[1]  # (dy, x, dw) / (dy, weight, x)
    g = site.kwargs.get("groups", 1)
    bm, bn, bk = (config[prefix + k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    tiles = -(-(dw.shape[0] // g) // bm) * -(-dw.shape[1] // bn) * g * dw.shape[2] * dw.shape[3]
    M = dy.shape[0] * dy.shape[2] * dy.shape[3]

    def chunks(v):  # as the launcher makes them: whole BLOCK_Ks a chunk, none empty
        v = min(v, -(-M // bk))
        return -(-M // (-(-(-(-M // v)) // bk) * bk))

    split = chunks(wgrad_split(site.rt, dy, tiles, M, bk))
    if split == 1:
        return []
    return [dict(config, **{prefix + "SPLIT": v}) for v in sorted({chunks(split // 2), chunks(split * 2)} - {1, split})]


# ------------------------------------------------------------------ checking a candidate


def _leaves(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, torch.nn.Module):
        yield from v.state_dict().values()
    elif isinstance(v, (tuple, list)):
        for x in v:
            yield from _leaves(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _leaves(x)


def _tolerance(site) -> float:
    dt = site.args[0].dtype
    if dt in (torch.bfloat16, torch.float16):
        return 3e-2
    if dt == torch.float64:
        return 1e-9
    # fp32: TF32 on a GPU where torch allows it, and another block size sums in another order
    return 1e-2 if site.args[0].is_cuda else 1e-4


def _agree(site, ref, got, ref_out, got_out) -> str | None:
    """None where every tensor the two launches wrote (and returned, where the
    shapes match) agrees; else what differs."""
    tol = _tolerance(site)
    pairs = list(zip(_leaves(ref), _leaves(got))) + list(zip(_leaves(ref_out), _leaves(got_out)))
    for i, (a, b) in enumerate(pairs):
        if a.shape != b.shape or not a.is_floating_point():
            continue
        a, b = a.double(), b.double()
        if torch.isnan(a).any() != torch.isnan(b).any():
            return f"tensor {i}: NaN where the default has none"
        scale = a.abs().nan_to_num(0.0).max().item() if a.numel() else 0.0
        err = (a - b).abs().nan_to_num(0.0).max().item() if a.numel() else 0.0
        if err > tol * max(scale, 1e-6):
            return f"tensor {i} {tuple(a.shape)}: off by {err:.3g} (max {scale:.3g})"
    return None


# ------------------------------------------------------------------ tuning


def record(module, x, train: bool = True) -> list[tuning.Site]:
    """The tunable launches of one forward (train: and backward, with a random
    output gradient), their inputs copied; the module's state, its
    parameters' gradients and its mode are put back (rt.one_step)."""
    with tuning.recording() as rec:
        rt.one_step(module, x, train, out_grad=torch.randn_like, keep_state=True)
    return list(rec.sites.values())


def _time(site, timer, config, work, **extra) -> float:
    return timer(lambda: site.call(config, work, **extra))


def _try(site, timer, config, work, result, **extra):
    """(ms, config), or None where the candidate fails to compile or launch (e.g. out of shared memory)."""
    result.tried += 1
    try:
        return _time(site, timer, config, work, **extra), config
    except Exception as e:  # a candidate's failure is a measurement, not an error of the run
        result.rejected.append((config, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]))
        return None


def precompile_candidates(site, configs, work, jobs: int, **extra) -> int:
    """Compile configs' kernels, `jobs` at a time, before they are timed
    (timing compiles each on first launch, one after another); returns how
    many compiles ran.  A config that fails to compile is left to fail again
    when it is timed, and is rejected there."""
    if jobs <= 1 or len(configs) < 2:
        return 0
    try:
        with parallel_compile.parallel(jobs, ignore_errors=True) as compiles:
            for c in configs:
                try:
                    site.call(c, work, **extra)
                except Exception:  # (a launcher's own check: the timing run raises it again)
                    pass
    except Exception as e:
        _ahead_failed(f"{site.name}'s candidates", e)
        return 0
    return compiles.submitted


def _ahead_failed(what, e):
    # compiling ahead only saves time: where it breaks, each kernel compiles when it is first timed
    warnings.warn(f"netdsl tune: compiling {what} ahead failed ({type(e).__name__}: {e}); "
                  "they compile one by one as they are timed")


def _time_each(site, timer, configs, work, result, jobs, **extra):
    """[(ms, config)] of the configs that ran."""
    if site.args[0].is_cuda:
        precompile_candidates(site, configs, work, jobs, **extra)
    return [t for c in configs if (t := _try(site, timer, c, work, result, **extra))]


def tune_site(site, timer, result: Result, jobs: int = 1) -> Result:
    """Time site's candidates (result.default_ms already measured) and keep the
    fastest that checks out; on a GPU each batch of candidates is compiled
    `jobs` at a time first."""
    work = tuning.clone((site.args, site.kwargs))
    if site.kind == "conv_backward":
        dx, dw = site.kwargs.get("dx") is not None, site.kwargs.get("dw") is not None
        parts = [p for p, on in (("d", dx), ("w", dw)) if on]
        # where its weight gradient can ride in the dgrad's programs (WGRAD_ADD), both ways are timed: the
        # parts apart (WGRAD_ADD 0), and the dgrad's candidates carrying the weight gradient (1)
        ways = [{"WGRAD_ADD": 0}, {"WGRAD_ADD": 1}] if dx and dw and kconv.wgrad_can_ride(
            site.rt, site.kwargs.get("groups", 1), site.kwargs.get("dbias"), site.kwargs.get("pointwise", False)) \
            else [{}]
        timed = []
        for way in ways:
            best = dict(way)
            for p in parts if not way.get("WGRAD_ADD") else ["d"]:  # each part alone first: the joint space
                only = p if len(parts) == 2 and not way.get("WGRAD_ADD") else None  # is too big to time whole
                got = _time_each(site, timer, [dict(c, **way) for c in part_candidates(site, p)], work, result, jobs,
                                 only=only)
                if got and p == "w":  # then the chunk count of a split-K wgrad, around its heuristic's
                    got += _time_each(site, timer, split_candidates(site, min(got, key=lambda t: t[0])[1], "w_"),
                                      work, result, jobs, only=only)
                if got:
                    best.update(min(got, key=lambda t: t[0])[1])
            timed += _time_each(site, timer, [dict(best, num_warps=w) for w in WARPS], work, result, jobs)
    else:
        timed = _time_each(site, timer, candidates(site), work, result, jobs)
        if timed and site.kind == "conv_wgrad":
            timed += _time_each(site, timer, split_candidates(site, min(timed, key=lambda t: t[0])[1], ""), work,
                                result, jobs)
    timed.sort(key=lambda t: t[0])
    ref = tuning.clone((site.args, site.kwargs))
    ref_out = site.call({}, ref)
    for ms, config in timed:
        if ms >= result.default_ms:
            break
        got = tuning.clone((site.args, site.kwargs))
        why = _agree(site, ref, got, ref_out, site.call(config, got))
        if why is None:
            result.best_ms, result.config = ms, config
            return result
        result.rejected.append((config, f"wrong result: {why}"))
    result.best_ms, result.config = result.default_ms, {}
    result.note = "defaults kept" if timed else "no candidate ran"
    return result


def tune(module, x, *, train: bool = True, timer=None, budget_s: float | None = None, retune: bool = False,
         save: bool = True, progress=None, jobs: int | None = None) -> list[Result]:
    """Tune every conv launch of one step of module on x (its device's);
    returns one Result per site, and saves the winners in the tuning file
    (tuning.store); save=False: for this process only.  timer(fn) -> ms: default CUDA-event timing (GPU only).
    budget_s: stop starting new sites after this many seconds.  retune: time
    sites that already have a saved config too.  progress(i, n, result): called
    after each site.  jobs: compiles at a time, on a GPU (default: one per
    CPU core, at most 32; 1: each compiles as it is first timed)."""
    jobs = jobs or parallel_compile.default_jobs()
    if timer is None:
        if not x.is_cuda:
            raise TuneError("tuning times kernels on a CUDA GPU; this input is on the CPU (pass timer= to tune anyway)")
        timer = gpu_timer
    start = time.perf_counter()
    if jobs > 1:
        try:  # the step's own kernels, before it is recorded
            parallel_compile.precompile(module, x, train=train, jobs=jobs)
        except Exception as e:
            _ahead_failed("the step's kernels", e)
    sites = record(module, x, train)
    results, todo = [], []
    for site in sites:
        r = Result(site.kind, site.name, site.shapes)
        if site.tuned is not None and not retune:
            r.config, r.note = site.tuned, "saved before"
        else:
            r.default_ms = _time(site, timer, {}, tuning.clone((site.args, site.kwargs)))
            todo.append((site, r))
        results.append(r)
    todo.sort(key=lambda sr: -sr[1].default_ms)
    new = {}
    for i, (site, r) in enumerate(todo):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            r.note = "not tuned: out of time"
            continue
        tune_site(site, timer, r, jobs)
        new[site.key] = {"config": r.config, "ms": r.best_ms, "default_ms": r.default_ms, "kernel": site.name,
                         "triton": _triton_version(), "torch": torch.__version__,
                         "date": datetime.date.today().isoformat()}
        if progress is not None:
            progress(i, len(todo), r)
    if new:
        tag = tuning.device_tag(x.device)
        tuning.store(tag, new) if save else tuning.register({tag: new})
    return results


def _triton_version() -> str:
    import triton

    return triton.__version__


def format_results(results) -> str:
    head = ("kind", "kernel", "shapes", "default ms", "tuned ms", "×", "config")
    rows = []
    for r in results:
        cfg = "defaults" if r.config == {} else " ".join(f"{k}={v}" for k, v in (r.config or {}).items())
        rows.append((r.kind, r.kernel, r.shapes.split(",")[0], f"{r.default_ms:.3f}" if r.default_ms else "",
                     f"{r.best_ms:.3f}" if r.best_ms else "", f"{r.speedup:.2f}" if r.speedup else "",
                     cfg + (f"  ({r.note})" if r.note and r.note != "defaults kept" else "")))
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + rows]
    return "\n".join(lines[:1] + ["─" * len(lines[0])] + lines[1:])
