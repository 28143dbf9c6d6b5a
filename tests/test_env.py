"""What a results file says it was measured on."""

import torch

from qframe.kernels.cpu.isa import ENV, ISAS, detected
from qframe.utils.env import environment, machine_text, results_header


def test_results_name_the_cpus_int8_isa_and_a_forced_one(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    env = environment()
    machine = env["machine"]
    assert machine["int8_isa"] == detected() and machine["int8_isa"] in ISAS and "int8_isa_forced" not in machine
    assert f"({machine['cores']} cores, int8 ISA {detected()}); torch " in results_header("t", env, "cmd")
    assert not torch.cuda.is_initialized()

    monkeypatch.setenv(ENV, " Portable ")
    env = environment()
    assert env["machine"]["int8_isa_forced"] == "portable"
    assert f"int8 ISA {detected()}, forced to portable); torch " in results_header("t", env, "cmd")

    del env["machine"]["int8_isa"], env["machine"]["int8_isa_forced"]  # as in an older results file
    assert f"({machine['cores']} cores); torch " in results_header("t", env, "cmd")


def test_a_benchmarks_own_machine_line_carries_its_details_and_the_isa():
    machine = {"cpu": "CPU X", "cores": 2, "int8_isa": "avx2"}
    assert machine_text(machine, "4 torch threads", "no GPU") == "CPU X (2 cores, 4 torch threads, no GPU, int8 ISA avx2)"
    assert machine_text({**machine, "int8_isa_forced": "portable"}) == "CPU X (2 cores, int8 ISA avx2, forced to portable)"
    assert machine_text({"cpu": "CPU X", "cores": 2}) == "CPU X (2 cores)"
