"""engine/hardware.py: the CPU's model and flags, which key the precision probe's cache and label
every benchmark figure."""
from engine.hardware import CpuInfo, read_cpuinfo

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
physical id\t: 0
flags\t\t: fpu avx512f avx512_bf16 sse2
processor\t: 1
model name\t: AMD EPYC 7B13
physical id\t: 1
flags\t\t: fpu avx512f avx512_bf16 sse2
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd sve bf16
CPU implementer\t: 0x41
"""


def test_x86_model_and_flags_come_from_the_first_processor_and_sockets_from_all(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(X86)
    assert read_cpuinfo(str(f)) == CpuInfo("AMD EPYC 7B13", ["fpu", "avx512f", "avx512_bf16", "sse2"], 2)


def test_arm_features_count_as_flags_and_the_model_stays_unknown(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(ARM)
    assert read_cpuinfo(str(f)) == CpuInfo(None, ["fp", "asimd", "sve", "bf16"], None)


def test_no_cpuinfo_is_no_facts_not_an_error(tmp_path):
    assert read_cpuinfo(str(tmp_path / "absent")) == CpuInfo(None, [], None)
