"""pipeline/environment.py: the environment block every benchmark result carries (CPU, ISA flags, what
oneDNN dispatched, versions, threads, load average) and the check that one table never mixes ISAs."""

from __future__ import annotations

import copy
import os
import platform

import pytest

from ltp_compress.pipeline import environment as E


def _onednn_usable() -> bool:
    import torch

    return platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available()


@pytest.fixture
def fresh_isa_cache():
    """kernels.cpu_isa() caches the cap it saw: clear it around a test that sets ONEDNN_MAX_CPU_ISA."""
    from ltp_compress.kernels import cpu_isa

    cpu_isa.cache_clear()
    yield
    cpu_isa.cache_clear()


def test_block_has_every_key_and_boolean_flags():
    load0 = E.loadavg()
    env = E.environment_block(3, load0)
    assert tuple(k for k in env if k in E.ENVIRONMENT_KEYS) == E.ENVIRONMENT_KEYS
    assert set(env["isa_flags"]) == set(E.ISA_FLAGS)
    assert all(isinstance(v, bool) for v in env["isa_flags"].values())
    assert env["threads"] == 3 and env["cpu_count"] == os.cpu_count()
    assert env["loadavg_start"] == load0 and len(env["loadavg_end"]) == 3
    assert set(env["versions"]) == set(E.VERSIONED) and env["versions"]["torch"]
    assert set(env["onednn"]) >= {"backend", "isa", "implementation", "max_cpu_isa", "error"}
    line = E.environment_summary(env)
    assert str(env["cpu_model"]) in line and ("AMX yes" in line or "AMX no" in line) and "3 threads" in line


def test_code_revision_is_the_checkouts_head_or_none(tmp_path):
    import shutil
    import subprocess

    assert E.code_revision(tmp_path) is None  # not a git checkout
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert E.code_revision(repo) == {"commit": head, "local_changes": False}
    (repo / "b.txt").write_text("untracked")  # untracked files are not the code that ran
    assert E.code_revision(repo)["local_changes"] is False
    for name in ("docs/results.md", "benchmarks/results/x.json", "README.md"):  # results and prose are not code
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("1")
        subprocess.run([*git, "add", name], check=True)
    subprocess.run([*git, "commit", "-qm", "results"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    for name in ("docs/results.md", "benchmarks/results/x.json", "README.md"):
        (repo / name).write_text("2")
    assert E.code_revision(repo) == {"commit": head, "local_changes": False}
    (repo / "a.txt").write_text("2")
    assert E.code_revision(repo) == {"commit": head, "local_changes": True}
    (repo / "sub").mkdir()
    assert E.code_revision(repo / "sub") is None  # inside a checkout but not its root: not this project's commit
    env = {"code_revision": {"commit": head, "local_changes": True}}
    assert f"code {head[:12]} + local changes" in E.environment_summary(env)


@pytest.mark.skipif(not _onednn_usable(), reason="oneDNN on x86 only")
@pytest.mark.parametrize("cap", ["AVX512_CORE_VNNI", "AVX2"])
def test_probe_under_a_cap_reports_a_capped_isa(cap, monkeypatch, fresh_isa_cache):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    probe = E.onednn_probe()
    assert probe["error"] is None, probe
    assert probe["max_cpu_isa"] == cap
    assert "amx" not in probe["implementation"].lower() and "AMX" not in probe["isa"]
    flags = E.isa_flags()
    assert not (flags["amx_int8"] or flags["amx_bf16"] or flags["amx_tile"])
    if cap == "AVX2":  # below VNNI: neither the flags nor the kernel oneDNN picks may claim VNNI
        assert not flags["avx512_vnni"] and "vnni" not in probe["implementation"].lower()
        assert "512" not in probe["isa"]
    env = E.environment_block(1, None)
    assert env["onednn_max_cpu_isa"] == cap and f"ONEDNN_MAX_CPU_ISA={cap}" in E.environment_summary(env)


def test_parse_verbose_lines_of_both_formats():
    new = ("onednn_verbose,v1,info,oneDNN v3.12.0 (commit x)\n"
           "onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with AVX512_FP16, Intel AMX with bfloat16 and 8-bit integer support\n"
           "onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation,exec_time\n"
           "onednn_verbose,v1,primitive,exec,cpu,reorder,simple:any,undef,src:s8,,64x16,0.25\n"
           "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:u8,,4x64:64x16,0.03\n")
    p = E.parse_onednn_verbose(new)
    assert p == {"onednn_version": "v3.12.0", "isa": "Intel AVX-512 with AVX512_FP16, Intel AMX with bfloat16 and 8-bit integer support",
                 "primitive": "matmul", "implementation": "brg_matmul:avx10_1_512_amx"}
    old = ("dnnl_verbose,info,cpu,isa:Intel AVX-512 with Intel DL Boost\n"
           "dnnl_verbose,exec,cpu,inner_product,brgemm:avx512_core_vnni,forward_inference,src_u8,,mb4ic64oc16,0.02\n")
    q = E.parse_onednn_verbose(old)
    assert q["isa"] == "Intel AVX-512 with Intel DL Boost" and q["implementation"] == "brgemm:avx512_core_vnni"


def _env(amx: bool) -> dict:
    env = {"isa_flags": {k: (k.startswith("amx") and amx) or k == "avx2" or k == "avx512_vnni" for k in E.ISA_FLAGS},
           "onednn": {"isa": "Intel AMX" if amx else "Intel AVX-512 with Intel DL Boost",
                      "implementation": "brg_matmul:avx10_1_512_amx" if amx else "brg_matmul:avx512_core_vnni"}}
    return env


def test_one_table_never_mixes_two_isas():
    vnni, amx = _env(False), _env(True)
    E.check_same_isa({"a.json": vnni, "b.json": copy.deepcopy(vnni)}, speed=True)  # same ISA: fine
    with pytest.raises(E.EnvironmentMismatch) as e:
        E.check_same_isa({"sweep_vnni.json": vnni, "sweep_amx.json": amx}, speed=False)
    assert "sweep_vnni.json" in str(e.value) and "sweep_amx.json" in str(e.value) and "onednn_implementation" in str(e.value)
    only_impl = copy.deepcopy(vnni)
    only_impl["onednn"]["implementation"] = "gemm:jit"  # same flags, another kernel (e.g. an ONEDNN_MAX_CPU_ISA cap)
    with pytest.raises(E.EnvironmentMismatch):
        E.check_same_isa({"a.json": vnni, "capped.json": only_impl}, speed=True)


def test_a_file_without_an_environment_is_refused_for_speed_only():
    with pytest.raises(E.EnvironmentMismatch, match="old_e2e.json: no environment block.*re-measure"):
        E.check_same_isa({"this run": _env(False), "old_e2e.json": None}, speed=True)
    E.check_same_isa({"this run": _env(False), "old_sweep.json": None}, speed=False)  # accuracy: read as it is


def test_a_flag_no_kernel_dispatches_on_splits_speed_tables_only():
    """Two CPUs with AVX-512 VNNI, one with the 256-bit avx_vnni too, same oneDNN kernel: accuracy results share
    a table (the kernel that computed them is the same), speed results do not; an AMX flag splits both."""
    a = _env(False)
    b = copy.deepcopy(a)
    b["isa_flags"]["avx_vnni"] = not a["isa_flags"].get("avx_vnni", False)
    E.check_same_isa({"zen4.json": a, "zen5.json": b}, speed=False)
    with pytest.raises(E.EnvironmentMismatch, match="isa_flags"):
        E.check_same_isa({"zen4.json": a, "zen5.json": b}, speed=True)
    c = copy.deepcopy(a)
    c["isa_flags"]["amx_int8"] = True
    with pytest.raises(E.EnvironmentMismatch, match="isa_flags"):
        E.check_same_isa({"vnni.json": a, "amx.json": c}, speed=False)


def test_two_cpus_of_one_name_split_speed_tables_only():
    """One "model name" (a hypervisor shows two EPYC generations as "AMD EPYC"), the same flags and oneDNN kernel,
    another family / model: accuracy results share a table, speed results do not, and the summary names both."""
    a = {**_env(False), "cpu_model": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 17 stepping 1"}
    b = {**copy.deepcopy(a), "cpu_id": "AuthenticAMD family 26 model 2 stepping 1"}
    E.check_same_isa({"genoa.json": a, "turin.json": b}, speed=False)
    with pytest.raises(E.EnvironmentMismatch, match="cpu_id"):
        E.check_same_isa({"genoa.json": a, "turin.json": b}, speed=True)
    assert "family 25 model 17" in E.environment_summary(a)


def test_cpu_id_reads_the_first_cpu(tmp_path, monkeypatch):
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Xeon\nstepping\t: 8\n\n"
            "processor\t: 1\nvendor_id\t: Other\ncpu family\t: 9\nmodel\t\t: 1\nstepping\t: 0\n")
    f = tmp_path / "cpuinfo"
    f.write_text(text)
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(f if p == "/proc/cpuinfo" else p, *a, **k))
    assert E.cpu_id() == "GenuineIntel family 6 model 143 stepping 8"
