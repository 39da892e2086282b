"""BenchRecord round trips (CSV/JSON) and the machine description (incl. a fake Jetson)."""
from __future__ import annotations

import dataclasses
import os
import stat
import sys
import textwrap

import pytest

from mirage_edge.bench.hardware import PowerSampler, describe_hardware, jetson_info, parse_tegrastats_power
from mirage_edge.bench.record import BenchRecord, read_records, write_records
from mirage_edge.errors import MirageEdgeError


def _records():
    a = BenchRecord(run_id="r1", suite="s", model="student", role="student", backend="openvino", precision="int8",
                    threads=2, batch=1, input_h=512, input_w=512, task="fluid", task_kind="seg",
                    latency_median_ms=2.125, latency_p90_ms=2.5, latency_p99_ms=3.0, latency_max_ms=4.0,
                    latency_n=300, dice=0.8125, primary_metric="dice", primary_value=0.8125, notes="a, b; c")
    b = BenchRecord(run_id="r1", suite="s", model="bad", status="error", stage="load",
                    error='ArtifactError: checksum mismatch, "quoted"\nsecond line', latency_median_ms=float("nan"))
    return [a, b]


@pytest.mark.parametrize("suffix", ["json", "csv"])
def test_records_round_trip(tmp_path, suffix):
    recs = _records()
    paths = write_records(recs, tmp_path)
    back = read_records(paths[suffix])
    assert len(back) == 2
    assert dataclasses.asdict(back[0]) == dataclasses.asdict(recs[0])
    assert back[1].latency_median_ms is None  # NaN is "not measured"
    assert back[1].error == recs[1].error and back[1].status == "error"
    assert back[0].hd95 is None and back[0].latency_n == 300


def test_unknown_record_field_is_an_error():
    from mirage_edge.bench.record import record_from_dict

    with pytest.raises(MirageEdgeError, match="latency_ms"):
        record_from_dict({"latency_ms": 1.0})


def test_describe_this_machine():
    hw = describe_hardware(threads=2)
    assert hw.cpu_model and hw.cpu_count >= 1 and hw.threads == 2
    assert "numpy" in hw.versions
    assert hw.cpu_model in hw.summary() and "2 threads used" in hw.summary()
    assert "CPU:" in hw.markdown()


def _fake_jetson(root):
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, "
                                               "EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit\x00")
    (root / "proc/cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 "
                                       "atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t:"
                                       " 0x41\nCPU part\t: 0xd42\n")
    (root / "usr/local/cuda").mkdir(parents=True)
    (root / "usr/local/cuda/version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}')
    (root / "var/lib/nvpmodel").mkdir(parents=True)
    (root / "var/lib/nvpmodel/status").write_text("pmode:0002 fmode:default\n")


def test_jetson_description_from_files(tmp_path):
    _fake_jetson(tmp_path)
    info = jetson_info(tmp_path)
    assert info["module"] == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit"
    assert info["l4t"] == "36.4.3"
    assert info["jetpack"].startswith("6.1/6.2")
    assert info["cuda"] == "12.6.68"
    assert info["power_mode"] == "0002"
    hw = describe_hardware(threads=4, root=tmp_path)
    assert hw.cpu_model == "Cortex-A78AE"
    assert hw.cpu_flags == ["asimd", "asimdhp", "asimddp"]
    assert hw.summary().startswith("NVIDIA Jetson Orin Nano")
    assert "l4t=36.4.3" in hw.jetson_str()


def test_not_a_jetson(tmp_path):
    assert jetson_info(tmp_path) == {}


def test_tegrastats_lines():
    orin = ("11-27-2026 22:00:00 RAM 2448/7620MB (lfb 2x4MB) CPU [1%@729,0%@729] VDD_IN 4966mW/4966mW "
            "VDD_CPU_GPU_CV 1004mW/1004mW VDD_SOC 1405mW/1405mW")
    xavier = "RAM 1200/7772MB CPU [2%@1190] GPU 0%@114 POM_5V_IN 3571/3571 POM_5V_GPU 0/0"
    assert parse_tegrastats_power(orin) == pytest.approx(4.966)
    assert parse_tegrastats_power(xavier) == pytest.approx(3.571)
    assert parse_tegrastats_power("RAM 1/2MB") is None


def test_power_sampler_reads_a_tegrastats_process(tmp_path, monkeypatch):
    script = tmp_path / "tegrastats"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, time
        for w in (5000, 7000, 6000) * 50:
            print(f"RAM 1/2MB VDD_IN {{w}}mW/{{w}}mW", flush=True)
            time.sleep(0.005)
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    import time

    with PowerSampler(interval_ms=5) as power:
        deadline = time.time() + 10
        while len(power.samples) < 3 and time.time() < deadline:
            time.sleep(0.02)
    assert len(power.samples) >= 3
    assert 5.0 <= power.mean_w <= 7.0


def test_power_sampler_without_tegrastats(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with PowerSampler() as power:
        pass
    assert power.mean_w is None
