"""engine/hardware.py: the CPU's model and flags, which key the precision probe's cache and label
every benchmark figure."""
from engine.hardware import cpu_model_and_flags

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu avx512f avx512_bf16 sse2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu avx512f avx512_bf16 sse2
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd sve bf16
CPU implementer\t: 0x41
"""


def test_x86_model_and_flags_come_from_the_first_processor(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(X86)
    assert cpu_model_and_flags(str(f)) == ("AMD EPYC 7B13", ["fpu", "avx512f", "avx512_bf16", "sse2"])


def test_arm_features_count_as_flags_and_the_model_stays_unknown(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(ARM)
    assert cpu_model_and_flags(str(f)) == (None, ["fp", "asimd", "sve", "bf16"])


def test_no_cpuinfo_is_no_facts_not_an_error(tmp_path):
    assert cpu_model_and_flags(str(tmp_path / "absent")) == (None, [])
