"""An installed netdsl (not only this checkout) finds its grammar."""
import os
import subprocess
import sys

from conftest import ROOT, SPECS


def test_non_editable_install_finds_the_grammar(tmp_path):
    target = tmp_path / "site"
    try:  # build with the setuptools at hand if there is one; else pip fetches it
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation,
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    assert (target / "netdsl" / "grammars" / "netdsl.lark").is_file()
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ("import netdsl.parser as p, sys; g = p.grammar_path(); "
            "assert str(g).startswith(sys.argv[1]), g; "
            "sys.exit(__import__('netdsl.cli').cli.main(['check', sys.argv[2]]))")
    r = subprocess.run([sys.executable, "-c", code, str(target), str(SPECS / "lenet.net")],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "Total params: 61,706" in r.stdout
