"""Planned launches as the tests read them: a conv's backward is one launch
(conv_backward__X, the input and weight gradients' programs in one grid);
parts() shows it as its two parts, conv_dgrad__X and conv_wgrad__X (in that
order), each with its own constexprs (the launch's d_* and w_*, unprefixed)."""
from types import SimpleNamespace

COMBO = "conv_backward__"


class Part:
    """Stands in for a kernel in a part's (kernel, args, meta): .fn.__name__ is the part's name."""

    def __init__(self, name, kernel):
        self.fn = SimpleNamespace(__name__=name)
        self.kernel = kernel


def parts(launches):
    out = []
    for k, args, meta in launches:
        name = k.fn.__name__
        if not name.startswith(COMBO):
            out.append((k, args, meta))
            continue
        label = name[len(COMBO):]
        for flag, prefix, part in (("DGRAD", "d_", "conv_dgrad"), ("WGRAD", "w_", "conv_wgrad")):
            if meta[flag]:
                own = {n[len(prefix):]: v for n, v in meta.items() if n.startswith(prefix)}
                out.append((Part(f"{part}__{label}", k), args, own))
    return out
