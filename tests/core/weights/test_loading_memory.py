"""Loading fp32 shards into bf16 streams one tensor at a time: peak memory stays near the bf16 model's size."""
import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, sys, psutil
    import nextstep_core as ns
    load_model = ns.load_model  # the package imports torch lazily: import it before the baseline
    before = psutil.Process().memory_info().rss
    m = load_model(sys.argv[1], dtype="bfloat16")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent process across exec
    peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    weights = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    print(json.dumps({"delta": peak - before, "weights": weights}))
""")


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory):
    from nextstep_core.weights.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("medium")), size="medium", with_vae=False,
                                with_lm_head=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status")
def test_bf16_load_of_fp32_shards_peaks_near_the_bf16_size(medium_dir):
    psutil = pytest.importorskip("psutil")
    del psutil
    out = subprocess.run([sys.executable, "-c", PROBE, medium_dir], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[3]))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    fp32 = 2 * r["weights"]
    assert r["weights"] > 300 * 2**20  # a checkpoint of a few hundred MB (about 770 MB in fp32)
    assert r["delta"] < 1.1 * r["weights"] + 150 * 2**20, r  # bf16 model + one source tensor + allocator slack
    assert r["delta"] < 0.75 * fp32, r  # never the fp32 model
