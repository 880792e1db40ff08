"""`doctor`: every per-token path of the device, each checked against fp32 on the same weights, in a report that a
user can attach to a bug report; a wrong path makes it fail."""
import functools
import json

import pytest
from nextstep_core.frontend import doctor
from nextstep_core.frontend.cli import main as cli
from nextstep_core.generation import graph as G


@pytest.fixture(scope="module")
def report():
    return doctor.run("cpu", layers=1, size="tiny", out=lambda *_: None)


def test_every_cpu_path_in_every_format_runs_and_is_within_its_bound(report):
    assert report["ok"] and report["device"].startswith("cpu")
    ran = [(p["name"], p["dtype"], p["matmul"]) for p in report["paths"] if not p.get("skipped")]
    assert {(n, f) for n, f, _ in ran} >= {(name, fmt) for name in ("static", "eager") for fmt in doctor.FORMATS}
    assert ("static+compile", "fp32", None) in ran  # the compiled step, checked on the CPU
    assert ("eager", "fp8", "scaled_mm") in ran and ("eager", "fp8", "dequant") in ran  # fp8 both ways on a CPU
    for p in report["paths"]:
        assert p["max_token_err"] is not None and p["tokens_per_s"] > 0 and p["kernels_per_token"] > 0
        assert p["peak_mem_mb"] > 0 and p["attention"] and p["compiled"] == p["name"].endswith("+compile")
        assert (p["matmul"] is None) == (p["dtype"] in ("fp32", "bf16", "fp16"))
    fp32 = [p for p in report["paths"] if p["dtype"] == "fp32"]
    assert all(p["max_token_err"] < 1e-4 for p in fp32)  # the plain fp32 loop is the reference itself


def test_a_wrong_path_fails_the_report_and_the_command(monkeypatch, tmp_path, capsys):
    real = G.FixedStep._static_token

    def wrong(self, spec, forced=None, feed=True):
        real(self, spec, forced, feed)
        self.c.mul_(-1.0)

    monkeypatch.setattr(G.FixedStep, "_static_token", wrong)
    monkeypatch.setattr(doctor, "run", functools.partial(doctor.run, formats=("fp32",), size="tiny"))
    out = tmp_path / "r.json"
    assert cli(["doctor", "--device", "cpu", "--json", str(out)]) == 1
    r = json.loads(out.read_text())
    static = [p for p in r["paths"] if p["name"] == "static"][0]
    assert not r["ok"] and not static["ok"] and "differs from the plain step" in static["error"]
    assert "attach the --json report" in capsys.readouterr().out
