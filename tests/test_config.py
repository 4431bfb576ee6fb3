"""The site config: examples, defaults, resolution order, and an error that teaches for every mistake."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slurm_gpuarb import config
from slurm_gpuarb import config_services as cs
from slurm_gpuarb.config import Config, expand_hostlist, load, node_config, reservations_for, telemetry_for
from slurm_gpuarb.errors import ConfigError
from slurm_gpuarb.model import ControllerConfig, Matcher, Probe, ServiceConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "templates" / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.toml"))


def write(tmp_path: Path, text: str, mode: int = 0o644, name: str = "gpuarb.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def error_of(tmp_path: Path, text: str, **kw: Any) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, env=kw.pop("env", {}), **kw)
    msg = str(info.value)
    assert str(path) in msg, msg
    return msg


@pytest.fixture(autouse=True)
def no_site_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever this machine has in /etc/slurm, tests see no default file."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent" / "gpuarb.toml"))


# --------------------------------------------------------------------------- examples


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLE_FILES} >= {"workstation-3090ti.toml", "dgx-h100.toml", "mixed-cluster.toml"}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    cfg = load(path, env={})
    assert cfg.path == path
    assert cfg.telemetry == "auto"  # examples describe real sites
    assert set(cfg.policy.classes) == {"llm", "batch"}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_examples_are_documented_in_the_readme(path: Path) -> None:
    assert f"({path.name})" in (EXAMPLES / "README.md").read_text()


def test_workstation_example() -> None:
    cfg = load(EXAMPLES / "workstation-3090ti.toml", env={"GPUARB_TELEMETRY": "fake:rtx3090ti-24g"})
    assert cfg.node == "ws1"
    assert cfg.ledger_url == "sqlite:////var/lib/gpuarb/ledger.db"
    assert cfg.policy.margin_mib == 1024 and cfg.policy.quantum_mib == 512
    assert cfg.policy.default_class == "batch"
    (res,) = reservations_for(cfg, "ws1")
    assert (res.name, res.size_mib, res.gpu, res.mode) == ("ollama", 12288, 0, "static")
    assert res.match == Matcher(process="ollama")
    assert telemetry_for(cfg, "ws1") == "fake:rtx3090ti-24g"
    node = node_config(cfg, "ws1")
    assert node is not None and node.gpus[0].sku == "rtx3090ti-24g"


def test_dgx_example() -> None:
    cfg = load(EXAMPLES / "dgx-h100.toml", env={})
    mig, shard = cfg.nodes
    assert [g.index for g in mig.gpus] == list(range(8))
    assert all(g.mode == "mig" and g.mig == ("1g.10gb",) * 7 for g in mig.gpus)
    assert all(g.mode == "shard" and g.sku == "h100-80g" for g in shard.gpus)
    assert [(p.name, p.mode, p.default) for p in cfg.partitions] == [("llm", "mig", False), ("batch", "shard", True)]
    assert cfg.ledger_url.startswith("postgresql+psycopg://")
    assert cfg.pg_password_file == Path("/etc/slurm/gpuarb.pgpass")


def test_mixed_cluster_example() -> None:
    cfg = load(EXAMPLES / "mixed-cluster.toml", env={})
    assert [n.name for n in cfg.nodes] == ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a04", "gpu-h01", "gpu-h02"]
    assert {g.mode for n in cfg.nodes for g in n.gpus} == {"shard"}  # inherited from the batch partition
    assert [r.name for r in reservations_for(cfg, "gpu-h01")] == ["vllm-chat"]
    assert reservations_for(cfg, "gpu-h02") == []
    assert cfg.policy.default_ttl_s == 12 * 3600 and cfg.policy.max_ttl_s == 7 * 86400


# --------------------------------------------------------------------------- defaults and resolution


def test_defaults_without_any_file() -> None:
    cfg = load(env={"SLURMD_NODENAME": "n7"})
    assert cfg.path is None and cfg.version == 1 and cfg.node == "n7"
    assert cfg.ledger_url == "sqlite:////var/lib/gpuarb/ledger.db" and cfg.pg_password_file is None
    assert cfg.telemetry == "auto" and cfg.fail_mode == "open" and cfg.hook_deadline_s == 10
    assert cfg.socket_path == Path("/run/gpuarb/gpuarb.sock") and cfg.state_dir == Path("/run/gpuarb")
    assert cfg.log_file == Path("/var/log/gpuarb/gpuarb.log")
    p = cfg.policy
    assert (p.margin_mib, p.quantum_mib, p.default_class, p.max_ttl_s) == (1024, 512, "batch", None)
    llm, batch = p.classes["llm"], p.classes["batch"]
    assert (llm.priority, llm.preemptible, llm.may_degrade, llm.mps_thread_percent) == (1000, False, False, None)
    assert (batch.priority, batch.preemptible, batch.may_degrade, batch.mps_thread_percent) == (10, True, True, 30)
    assert (cfg.reservations, cfg.nodes, cfg.partitions) == ((), (), ())
    assert set(cfg.sources.values()) == {"default"}


def test_node_defaults_to_the_short_hostname() -> None:
    assert load(env={}).node == os.uname().nodename.split(".")[0]


def test_default_path_is_used_when_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'version = 1\n[host]\nnode = "fromdefault"\n')
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(path))
    cfg = load(env={})
    assert (cfg.path, cfg.node) == (path, "fromdefault")


def test_gpuarb_config_beats_the_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(write(tmp_path, "version = 1\n", name="default.toml")))
    named = write(tmp_path, 'version = 1\n[host]\nnode = "fromenv"\n', name="named.toml")
    assert load(env={"GPUARB_CONFIG": str(named)}).node == "fromenv"


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_named_file_that_is_missing_is_an_error(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        if how == "argument":
            load(missing, env={})
        else:
            load(env={"GPUARB_CONFIG": str(missing)})


FILE_SETTINGS = """version = 1
[host]
node = "filenode"
[ledger]
url = "sqlite:////srv/file.db"
[telemetry]
backend = "nvml"
[daemon]
socket = "/srv/file.sock"
[hooks]
fail_mode = "closed"
deadline = "30s"
"""


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, FILE_SETTINGS)
    cfg = load(path, env={"SLURMD_NODENAME": "slurmd"})
    assert (cfg.node, cfg.ledger_url, cfg.telemetry, cfg.fail_mode, cfg.hook_deadline_s) == (
        "filenode", "sqlite:////srv/file.db", "nvml", "closed", 30)
    env = {"GPUARB_NODE": "envnode", "GPUARB_LEDGER": "sqlite:////srv/env.db", "GPUARB_TELEMETRY": "smi",
           "GPUARB_SOCKET": "/srv/env.sock", "GPUARB_LOG_FILE": "/srv/env.log", "GPUARB_FAIL_MODE": "open",
           "GPUARB_STATE_DIR": "/srv/state", "GPUARB_HOOK_DEADLINE": "5s"}
    cfg = load(path, env=env)
    assert (cfg.node, cfg.ledger_url, cfg.telemetry, cfg.socket_path, cfg.log_file, cfg.fail_mode) == (
        "envnode", "sqlite:////srv/env.db", "smi", Path("/srv/env.sock"), Path("/srv/env.log"), "open")
    assert (cfg.state_dir, cfg.hook_deadline_s) == (Path("/srv/state"), 5)
    assert cfg.sources["node"] == "GPUARB_NODE" and cfg.sources["pg_password_file"] == "default"
    cfg = load(path, env=env, overrides={"node": "flagnode", "telemetry": "fake:h100-80g", "fail_mode": None,
                                         "socket_path": Path("/srv/flag.sock"), "hook_deadline_s": 3})
    assert (cfg.node, cfg.telemetry, cfg.socket_path, cfg.hook_deadline_s) == (
        "flagnode", "fake:h100-80g", Path("/srv/flag.sock"), 3)
    assert cfg.fail_mode == "open"  # None means "flag not given"
    assert cfg.sources["node"] == "option" and cfg.sources["fail_mode"] == "GPUARB_FAIL_MODE"


def test_file_node_beats_slurmd_nodename(tmp_path: Path) -> None:
    assert load(write(tmp_path, FILE_SETTINGS), env={"SLURMD_NODENAME": "n1"}).node == "filenode"


def test_empty_environment_values_count_as_unset(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, FILE_SETTINGS), env={"GPUARB_NODE": "", "GPUARB_CONFIG": "", "GPUARB_TELEMETRY": ""})
    assert (cfg.node, cfg.telemetry) == ("filenode", "nvml")


def test_unknown_override_suggests_the_field() -> None:
    with pytest.raises(ConfigError, match=r"option ledger: unknown key; did you mean 'ledger_url'\?"):
        load(env={}, overrides={"ledger": "sqlite:////x.db"})


def test_override_of_the_wrong_type_names_the_option() -> None:
    with pytest.raises(ConfigError, match="option fail_mode: expected a string, found integer 1"):
        load(env={}, overrides={"fail_mode": 1})


@pytest.mark.parametrize(("var", "value", "expect"), [
    ("GPUARB_FAIL_MODE", "maybe", "expected open or closed"),
    ("GPUARB_TELEMETRY", "fake", "fake:PRESET"),
    ("GPUARB_SOCKET", "relative.sock", "absolute path"),
    ("GPUARB_HOOK_DEADLINE", "10", "duration"),
    ("GPUARB_NODE", "bad name", "not a node name"),
    ("GPUARB_LEDGER", "mysql://x/y", "ledger URL"),
])
def test_environment_errors_name_the_variable(var: str, value: str, expect: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env={var: value})
    assert f"environment variable {var}" in str(info.value) and expect in str(info.value)


# --------------------------------------------------------------------------- errors: every one names file and key


V = "version = 1\n"
NODES = V + """
[[nodes]]
name = "n1"
gpus = [ { index = 0, sku = "h100-80g" }, { index = 1, sku = "h100-80g" } ]
"""

ERRORS: list[tuple[str, str, list[str]]] = [
    ("no-version", "[policy]\nmargin = \"1GiB\"\n", ["version", "add `version = 1`"]),
    ("version-2", "version = 2\n", ["this gpuarb reads version 1", "integer 2"]),
    ("version-string", 'version = "1"\n', ["this gpuarb reads version 1", "string '1'"]),
    ("version-bool", "version = true\n", ["this gpuarb reads version 1"]),
    ("version-float", "version = 1.0\n", ["this gpuarb reads version 1", "float 1.0"]),
    ("syntax", V + "[policy]\nmargin = \n", ["not valid TOML", "line 3"]),
    ("unknown-top", V + "[polcy]\n", ["polcy", "did you mean 'policy'", "expected one of"]),
    ("unknown-class-key", V + "[classes.batch]\npriority = 1\npreemptable = true\n",
     ["classes.batch.preemptable", "did you mean 'preemptible'", "priority, preemptible, may_degrade, qos"]),
    ("unknown-no-hint", V + "[hooks]\nzzz = 1\n", ["hooks.zzz: unknown key (expected one of: fail_mode, deadline)"]),
    ("margin-type", V + "[policy]\nmargin = 1\n", ["policy.margin", "expected a size string", "integer 1"]),
    ("margin-unit", V + '[policy]\nmargin = "1XiB"\n', ["policy.margin", "unknown unit 'XiB'"]),
    ("margin-bare", V + '[policy]\nmargin = "1024"\n', ["policy.margin", "not a size"]),
    ("zero-bad-unit", V + '[policy]\nmargin = "0XB"\n', ["policy.margin", "unknown unit"]),
    ("quantum-small", V + '[policy]\nquantum = "32MiB"\n', ["policy.quantum", "at least 64MiB"]),
    ("quantum-zero", V + '[policy]\nquantum = "0MiB"\n', ["policy.quantum", "'0MiB' is zero"]),
    ("ttl", V + '[policy]\nmax_ttl = "2 hours"\n', ["policy.max_ttl", "duration"]),
    ("ttl-order", V + '[policy]\ndefault_ttl = "2h"\nmax_ttl = "1h"\n', ["policy.default_ttl", "max_ttl"]),
    ("default-class", V + '[policy]\ndefault_class = "bulk"\n', ["policy.default_class", "'bulk'", "llm, batch"]),
    ("default-class-replaced", V + "[classes.llm]\npriority = 5\n", ["policy.default_class", "'batch'"]),
    ("class-name", V + "[classes.Batch]\npriority = 1\n", ["classes.Batch", "prio="]),
    ("class-name-long", V + f"[classes.{'a' * 33}]\npriority = 1\n", ["classes.aaaa", "prio="]),
    ("class-empty", V + "[classes]\n", ["classes", "at least one class"]),
    ("class-not-table", V + "[classes]\nbatch = 5\n", ["classes.batch", "expected a table", "integer 5"]),
    ("priority-missing", V + "[classes.batch]\npreemptible = true\n", ["classes.batch.priority", "missing"]),
    ("priority-bool", V + "[classes.batch]\npriority = true\n", ["classes.batch.priority", "boolean true"]),
    ("priority-float", V + "[classes.batch]\npriority = 1.5\n", ["classes.batch.priority", "float 1.5"]),
    ("priority-negative", V + "[classes.batch]\npriority = -1\n", ["classes.batch.priority", "0 to"]),
    ("preemptible-type", V + '[classes.batch]\npriority = 1\npreemptible = "yes"\n',
     ["classes.batch.preemptible", "true or false", "string 'yes'"]),
    ("mps-0", V + "[classes.batch]\npriority = 1\nmps_thread_percent = 0\n",
     ["classes.batch.mps_thread_percent", "1 to 100"]),
    ("mps-101", V + "[classes.batch]\npriority = 1\nmps_thread_percent = 101\n", ["mps_thread_percent", "1 to 100"]),
    ("qos", V + '[classes.batch]\npriority = 1\nqos = "High Prio"\n', ["classes.batch.qos", "QoS"]),
    ("telemetry-top", V + 'telemetry = "nvml"\n', ["telemetry", "expected a table ([telemetry])"]),
    ("telemetry", V + '[telemetry]\nbackend = "cuda"\n', ["telemetry.backend", "auto, nvml, smi or fake:PRESET"]),
    ("socket-rel", V + '[daemon]\nsocket = "gpuarb.sock"\n', ["daemon.socket", "absolute path"]),
    ("fail-mode", V + '[hooks]\nfail_mode = "shut"\n', ["hooks.fail_mode", "open or closed"]),
    ("deadline-int", V + "[hooks]\ndeadline = 10\n", ["hooks.deadline", 'duration string', "integer 10"]),
    ("host-node", V + '[host]\nnode = "ws 1"\n', ["host.node", "not a node name"]),
    ("url-scheme", V + '[ledger]\nurl = "postgres://gpuarb@db/gpuarb"\n', ["ledger.url", "postgresql, not postgres"]),
    ("url-relative", V + '[ledger]\nurl = "sqlite:///ledger.db"\n', ["ledger.url", "absolute path"]),
    ("password-file", V + '[ledger]\npassword_file = "pgpass"\n', ["ledger.password_file", "absolute path"]),
    ("res-not-array", V + "reservations = 5\n", ["reservations", "array of tables"]),
    ("res-missing-size", V + '[[reservations]]\nname = "o"\nmatch = { process = "o" }\n',
     ["reservations[0].size", "missing"]),
    ("res-size", V + '[[reservations]]\nname = "o"\nsize = "12"\nmatch = { process = "o" }\n',
     ["reservations[0].size", "size"]),
    ("res-no-match", V + '[[reservations]]\nname = "o"\nsize = "1GiB"\n', ["reservations[0].match", "process"]),
    ("res-match-key", V + '[[reservations]]\nname = "o"\nsize = "1GiB"\nmatch = { proces = "o" }\n',
     ["reservations[0].match.proces", "did you mean 'process'"]),
    ("res-comm", V + '[[reservations]]\nname = "o"\nsize = "1GiB"\nmatch = { process = "a-very-long-name" }\n',
     ["reservations[0].match.process", "15"]),
    ("res-pidfile", V + '[[reservations]]\nname = "o"\nsize = "1GiB"\nmatch = { pidfile = "o.pid" }\n',
     ["reservations[0].match.pidfile", "absolute path"]),
    ("res-dup", V + '[[reservations]]\nname = "o"\nsize = "1GiB"\nmatch = { user = "o" }\n' * 2,
     ["reservations[1].name", "declared twice"]),
    ("res-mode", V + '[[reservations]]\nname = "o"\nsize = "1GiB"\nmode = "pinned"\nmatch = { user = "o" }\n',
     ["reservations[0].mode", "static, holder"]),
    ("res-node", NODES + '[[reservations]]\nname = "o"\nsize = "1GiB"\nnode = "n2"\nmatch = { user = "o" }\n',
     ["reservations[0].node", "'n2' is not declared"]),
    ("res-gpu", NODES + '[[reservations]]\nname = "o"\nsize = "1GiB"\nnode = "n1"\ngpu = 5\nmatch = { user = "o" }\n',
     ["reservations[0].gpu", "node 'n1' has no GPU with index 5"]),
    ("res-gpu-any", NODES + '[[reservations]]\nname = "o"\nsize = "1GiB"\ngpu = 5\nmatch = { user = "o" }\n',
     ["reservations[0].gpu", "no declared node has GPU with index 5"]),
    ("node-dup", NODES + '[[nodes]]\nname = "n[0-1]"\ngpus = [ { index = 0, sku = "x" } ]\n',
     ["nodes[1].name", "'n1' is declared twice"]),
    ("node-hostlist", V + '[[nodes]]\nname = "n[1-"\ngpus = [ { index = 0, sku = "x" } ]\n',
     ["nodes[0].name", "hostlist", "unbalanced"]),
    ("node-hostlist-reversed", V + '[[nodes]]\nname = "n[9-1]"\ngpus = [ { index = 0, sku = "x" } ]\n',
     ["nodes[0].name", "reversed"]),
    ("node-no-gpus", V + '[[nodes]]\nname = "n1"\n', ["nodes[0].gpus", "missing"]),
    ("node-telemetry", V + '[[nodes]]\nname = "n1"\ntelemetry = "fake:"\ngpus = [ { index = 0, sku = "x" } ]\n',
     ["nodes[0].telemetry", "fake:PRESET"]),
    ("gpu-dup", V + '[[nodes]]\nname = "n1"\ngpus = [ { index = 0, sku = "x" }, { index = 0, sku = "x" } ]\n',
     ["nodes[0].gpus[1].index", "declared twice"]),
    ("gpu-count-overlap", V + '[[nodes]]\nname = "n1"\ngpus = [ { count = 2, sku = "x" }, { index = 1, sku = "x" } ]\n',
     ["nodes[0].gpus[1].index", "declared twice"]),
    ("gpu-index-and-count", V + '[[nodes]]\nname = "n1"\ngpus = [ { index = 0, count = 2, sku = "x" } ]\n',
     ["nodes[0].gpus[0]", "exactly one of index"]),
    ("gpu-no-sku", V + '[[nodes]]\nname = "n1"\ngpus = [ { index = 0 } ]\n', ["nodes[0].gpus[0].sku", "missing"]),
    ("gpu-sku", V + '[[nodes]]\nname = "n1"\ngpus = [ { index = 0, sku = "H100 80GB" } ]\n',
     ["nodes[0].gpus[0].sku", "not a SKU"]),
    ("gpu-key", V + '[[nodes]]\nname = "n1"\ngpus = [ { idx = 0, sku = "x" } ]\n',
     ["nodes[0].gpus[0].idx", "did you mean 'index'"]),
    ("gpu-mode", V + '[[nodes]]\nname = "n1"\ngpus = [ { index = 0, sku = "x", mode = "split" } ]\n',
     ["nodes[0].gpus[0].mode", "whole, shard, mig, mps"]),
    ("gpu-minor-dup", V + '[[nodes]]\nname = "n1"\ngpus = [ { index = 0, sku = "x", minor = 3 }, '
     '{ index = 1, sku = "x", minor = 3 } ]\n', ["nodes[0].gpus[1].minor", "/dev/nvidia3"]),
    ("gpu-minor-count", V + '[[nodes]]\nname = "n1"\ngpus = [ { count = 2, sku = "x", minor = 3 } ]\n',
     ["nodes[0].gpus[0].minor", "count"]),
    ("gpu-mig-mode", V + '[[nodes]]\nname = "n1"\n'
     'gpus = [ { index = 0, sku = "x", mode = "shard", mig = ["1g.10gb"] } ]\n',
     ["nodes[0].gpus[0].mig", 'mode = "mig"']),
    ("gpu-mig-profile", V + '[[nodes]]\nname = "n1"\n'
     'gpus = [ { index = 0, sku = "x", mode = "mig", mig = ["big"] } ]\n',
     ["nodes[0].gpus[0].mig[0]", "MIG profile"]),
    ("gpu-mig-inherited-whole", V + '[[nodes]]\nname = "n1"\ngpus = [ { index = 0, sku = "x", mig = ["1g.10gb"] } ]\n',
     ["nodes", "'n1' GPU 0 has a MIG layout"]),
    ("part-node", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1", "n9"]\n', ["partitions[0].nodes[1]", "'n9'"]),
    ("part-no-nodes-declared", V + '[[partitions]]\nname = "p"\nnodes = ["n1"]\n', ["partitions[0].nodes[0]", "'n1'"]),
    ("part-node-twice", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1", "n1"]\n',
     ["partitions[0].nodes[1]", "listed twice"]),
    ("part-nodes-type", NODES + '[[partitions]]\nname = "p"\nnodes = [1]\n',
     ["partitions[0].nodes[0]", "expected a string (node name), found integer 1"]),
    ("part-no-classes", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1"]\nclasses = []\n',
     ["partitions[0].classes", "leave it out"]),
    ("part-empty", NODES + '[[partitions]]\nname = "p"\nnodes = []\n', ["partitions[0].nodes", "missing"]),
    ("part-class", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1"]\nclasses = ["llm", "bulk"]\n',
     ["partitions[0].classes[1]", "'bulk'"]),
    ("part-dup", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1"]\n' * 2, ["partitions[1].name", "twice"]),
    ("part-default", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1"]\ndefault = true\n'
     '[[partitions]]\nname = "q"\nnodes = ["n1"]\ndefault = true\n', ["partitions[1].default", "one"]),
    ("part-mode", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1"]\nmode = "virtual"\n',
     ["partitions[0].mode", "whole, shard, mig, mps"]),
    ("part-mode-mismatch", V + '[[nodes]]\nname = "n1"\ngpus = [ { index = 0, sku = "x", mode = "shard" } ]\n'
     '[[partitions]]\nname = "p"\nnodes = ["n1"]\nmode = "mig"\n', ["partitions[0].mode", "'p' is mig", "'n1'"]),
    ("part-whole-on-mig", V + '[[nodes]]\nname = "n1"\ngpus = [ { index = 0, sku = "x", mode = "mig" } ]\n'
     '[[partitions]]\nname = "p"\nnodes = ["n1"]\n', ["partitions[0].mode", "'p' is whole"]),
    ("part-modes-conflict", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1"]\nmode = "shard"\n'
     '[[partitions]]\nname = "q"\nnodes = ["n1"]\nmode = "mps"\n', ["partitions", "p and q", "set mode"]),
]


@pytest.mark.parametrize(("text", "expect"), [(t, e) for _, t, e in ERRORS], ids=[i for i, _, _ in ERRORS])
def test_errors_name_file_key_and_expectation(tmp_path: Path, text: str, expect: list[str]) -> None:
    msg = error_of(tmp_path, text)
    for part in expect:
        assert part in msg, msg


def test_the_error_is_one_line_with_its_cause(tmp_path: Path) -> None:
    msg = error_of(tmp_path, V + '[policy]\nmargin = "1G"\n')
    assert "\n" not in msg and msg.endswith("policy.margin: expected a size such as \"12GiB\": '1G' is not a size "
                                           "(expected a number and a unit, MiB, GiB, TiB, MB, GB or TB, e.g. 6GiB)")


def test_zero_margin_is_allowed(tmp_path: Path) -> None:
    assert load(write(tmp_path, V + '[policy]\nmargin = "0MiB"\n'), env={}).policy.margin_mib == 0


def test_file_classes_replace_the_builtin_pair(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, V + '[policy]\ndefault_class = "bulk"\n[classes.bulk]\npriority = 3\n'), env={})
    bulk = cfg.policy.classes["bulk"]
    assert list(cfg.policy.classes) == ["bulk"]
    assert (bulk.preemptible, bulk.may_degrade, bulk.qos, bulk.mps_thread_percent) == (False, False, "bulk", None)


def test_class_grammar_matches_the_spec_grammar() -> None:
    spec = pytest.importorskip("slurm_gpuarb.spec")
    assert config.CLASS_NAME_RE.pattern == spec.NAME_RE.pattern


# --------------------------------------------------------------------------- secrets and permissions


@pytest.mark.parametrize("url", ["postgresql+psycopg://gpuarb:s3cret@db/gpuarb",
                                 "postgresql://gpuarb@db/gpuarb?password=s3cret"])
def test_a_password_in_the_url_is_refused_and_never_echoed(tmp_path: Path, url: str) -> None:
    msg = error_of(tmp_path, V + f'[ledger]\nurl = "{url}"\n')
    assert "ledger.url" in msg and "password_file" in msg and "s3cret" not in msg
    with pytest.raises(ConfigError) as info:
        load(env={"GPUARB_LEDGER": url})
    assert "GPUARB_LEDGER" in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load(env={}, overrides={"ledger_url": url})
    assert "option ledger_url" in str(info.value) and "s3cret" not in str(info.value)


def test_password_file_is_accepted(tmp_path: Path) -> None:
    cfg = load(env={"GPUARB_LEDGER": "postgresql+psycopg://gpuarb@db/gpuarb",
                    "GPUARB_LEDGER_PASSWORD_FILE": "/etc/slurm/gpuarb.pgpass"})
    assert cfg.pg_password_file == Path("/etc/slurm/gpuarb.pgpass")


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_a_writable_config_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, V, mode=mode)
    with pytest.raises(ConfigError, match="writable") as info:
        load(path, env={})
    assert str(path) in str(info.value) and "chmod go-w" in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_a_safe_config_is_read(tmp_path: Path, mode: int) -> None:
    assert load(write(tmp_path, V, mode=mode), env={}).version == 1


def test_a_directory_is_not_a_config(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o755)
    with pytest.raises(ConfigError, match="not a regular file"):
        load(tmp_path / "d", env={})


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'version = 1\n[host]\nnode = "caf\xe9"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"latin1\.toml: is not UTF-8"):
        load(path, env={})


# --------------------------------------------------------------------------- inventory and helpers


def test_gpu_modes_come_from_partitions(tmp_path: Path) -> None:
    text = V + """
[[nodes]]
name = "n[1-3]"
gpus = [ { count = 2, sku = "a100-80g" }, { index = 4, sku = "a100-80g", mode = "whole", minor = 7 } ]
[[partitions]]
name = "batch"
nodes = ["n[1-2]"]
mode = "shard"
[[partitions]]
name = "llm"
nodes = ["n[1-3]"]
classes = ["llm"]
"""
    cfg = load(write(tmp_path, text), env={})
    n1, n3 = node_config(cfg, "n1"), node_config(cfg, "n3")
    assert n1 is not None and n3 is not None
    assert [(g.index, g.mode, g.minor) for g in n1.gpus] == [(0, "shard", None), (1, "shard", None), (4, "whole", 7)]
    assert [g.mode for g in n3.gpus] == ["whole"] * 3  # only in a whole partition
    batch, llm = cfg.partitions
    assert batch.classes == ("llm", "batch") and llm.classes == ("llm",) and llm.mode == "whole"
    assert node_config(cfg, "n4") is None


def test_reservations_for_a_node(tmp_path: Path) -> None:
    text = V + """
[[nodes]]
name = "big"
gpus = [ { count = 2, sku = "h100-80g" } ]
[[nodes]]
name = "small"
gpus = [ { index = 0, sku = "rtx3060-12g" } ]
[[reservations]]
name = "everywhere"
size = "1GiB"
match = { user = "svc" }
[[reservations]]
name = "second-gpu"
size = "2GiB"
gpu = 1
match = { user = "svc" }
[[reservations]]
name = "pinned"
size = "3GiB"
node = "small"
mode = "holder"
match = { process = "ollama", pidfile = "/run/ollama.pid" }
probe = { kind = "ollama", url = "http://127.0.0.1:11434" }
"""
    cfg = load(write(tmp_path, text), env={})
    assert [r.name for r in reservations_for(cfg, "big")] == ["everywhere", "second-gpu"]
    assert [r.name for r in reservations_for(cfg, "small")] == ["everywhere", "pinned"]
    assert [r.name for r in reservations_for(cfg, "elsewhere")] == ["everywhere", "second-gpu"]
    assert cfg.reservations[2].match == Matcher(process="ollama", pidfile="/run/ollama.pid")
    assert cfg.reservations[2].mode == "holder"


def test_node_less_reservations_apply_everywhere_without_an_inventory(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, V + '[[reservations]]\nname = "o"\nsize = "1GiB"\ngpu = 3\nmatch = { user = "o" }\n'),
               env={})
    assert [r.name for r in reservations_for(cfg, "any")] == ["o"]


TELEMETRY = V + """
[telemetry]
backend = "nvml"
[[nodes]]
name = "fake1"
telemetry = "fake:rtx3060-12g"
gpus = [ { index = 0, sku = "rtx3060-12g" } ]
[[nodes]]
name = "real"
gpus = [ { index = 0, sku = "h100-80g" } ]
"""


def test_telemetry_per_node(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, TELEMETRY), env={})
    assert telemetry_for(cfg, "fake1") == "fake:rtx3060-12g"
    assert telemetry_for(cfg, "real") == telemetry_for(cfg, "unknown") == "nvml"


def test_telemetry_from_the_environment_applies_to_every_node(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, TELEMETRY), env={"GPUARB_TELEMETRY": "fake:h100-80g"})
    assert telemetry_for(cfg, "fake1") == telemetry_for(cfg, "real") == "fake:h100-80g"


@pytest.mark.parametrize(("text", "names"), [
    ("ws1", ["ws1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("dgx[01-02,10]", ["dgx01", "dgx02", "dgx10"]),
    ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]),
    ("gpu-[7]-x", ["gpu-7-x"]),
])
def test_expand_hostlist(text: str, names: list[str]) -> None:
    assert expand_hostlist(text) == names


@pytest.mark.parametrize("text", ["n[1-", "n1]", "n[a-b]", "n[]", "n[3-1]", "n[0-999999]"])
def test_expand_hostlist_refuses(text: str) -> None:  # load() turns this into a ConfigError
    with pytest.raises(ValueError):
        expand_hostlist(text)


# --------------------------------------------------------------------------- probes, services, controller

RES = V + '[[reservations]]\nname = "ollama"\nsize = "12GiB"\nmatch = { process = "ollama" }\n'
OLLAMA_PROBE = 'probe = { kind = "ollama", url = "http://127.0.0.1:11434" }\n'
SERVICES = V + """
[[reservations]]
name = "ollama"
size = "12GiB"
mode = "holder"
grace = "10m"
match = { process = "ollama" }
probe = { kind = "ollama", url = "http://127.0.0.1:11434/", model = "llama3:8b", timeout = "500ms" }

[[reservations]]
name = "plain"
size = "1GiB"
match = { user = "svc" }

[[services]]
name = "vllm-a"
kind = "vllm"
url = "https://gpu-h01:8000"
models = ["meta-llama/Llama-3.1-8B-Instruct", "llama3:8b"]

[[services]]
name = "tf"
kind = "tfserving"
url = "http://[::1]:8501"
models = ["ranker", "half_plus_two"]
timeout = "3s"

[controller]
interval = "30s"
holder_class = "llm"
holder_partition = "llm"
holder_time_limit = "7-00:00:00"
shrink = false

[[nodes]]
name = "n1"
gpus = [ { index = 0, sku = "rtx3090ti-24g" } ]

[[partitions]]
name = "llm"
nodes = ["n1"]
classes = ["llm"]
"""


def test_probes_services_and_controller(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, SERVICES), env={})
    ollama, plain = cfg.reservations
    assert ollama.probe == Probe("ollama", "http://127.0.0.1:11434", "llama3:8b", 0.5)  # the trailing / dropped
    assert (ollama.mode, ollama.grace_s, plain.probe, plain.grace_s) == ("holder", 600.0, None, 300.0)
    assert cfg.services == (
        ServiceConfig("ollama", ollama.probe, ("llama3:8b",), reservation="ollama"),
        ServiceConfig("vllm-a", Probe("vllm", "https://gpu-h01:8000", None, 2.0),
                      ("meta-llama/Llama-3.1-8B-Instruct", "llama3:8b")),
        ServiceConfig("tf", Probe("tfserving", "http://[::1]:8501", "ranker", 3.0), ("ranker", "half_plus_two")),
    )
    assert cfg.controller == ControllerConfig(30.0, "llm", "llm", False, "7-00:00:00")


def test_controller_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, RES + OLLAMA_PROBE.replace("}", ', timeout = "2s" }')), env={})
    assert cfg.controller == ControllerConfig() == ControllerConfig(15.0, None, None, True, "UNLIMITED")
    assert cfg.services[0].probe.timeout_s == 2.0
    assert load(env={}).services == ()


def test_workstation_example_probes_its_ollama() -> None:
    cfg = load(EXAMPLES / "workstation-3090ti.toml", env={})
    assert cfg.services == (ServiceConfig("ollama", Probe("ollama", "http://127.0.0.1:11434", "llama3:8b", 2.0),
                                          ("llama3:8b",), "ollama"),)
    assert cfg.reservations[0].mode == "static"  # the probe changes nothing in the rendered files


def test_mixed_cluster_example_services() -> None:
    cfg = load(EXAMPLES / "mixed-cluster.toml", env={})
    assert [(s.name, s.probe.kind, s.reservation) for s in cfg.services] == [
        ("vllm-chat", "vllm", "vllm-chat"), ("ollama-fallback", "ollama", None), ("tf-ranker", "tfserving", None)]
    assert cfg.services[2].probe.timeout_s == 0.5


@pytest.mark.parametrize(("limit"), ["UNLIMITED", "INFINITE", "60", "30:00", "12:00:00", "2-12", "2-12:30",
                                     "2-12:30:00"])
def test_holder_time_limits_slurm_accepts(tmp_path: Path, limit: str) -> None:
    cfg = load(write(tmp_path, V + f'[controller]\nholder_time_limit = "{limit}"\n'), env={})
    assert cfg.controller.holder_time_limit == limit


HOLDER = RES.replace('size = "12GiB"', 'size = "12GiB"\nmode = "holder"')
SVC = V + '[[services]]\nname = "v"\nkind = "vllm"\nurl = "http://h:8000"\n'
CLASSES_ALL_PREEMPTIBLE = "[classes.batch]\npriority = 1\npreemptible = true\n"

SERVICE_ERRORS: list[tuple[str, str, list[str]]] = [
    ("probe-not-table", RES + 'probe = "http://h:1"\n', ["reservations[0].probe", "expected a table", "string"]),
    ("probe-kind-missing", RES + 'probe = { url = "http://h:1" }\n', ["reservations[0].probe.kind", "missing"]),
    ("probe-kind-typo", RES + 'probe = { kind = "olama", url = "http://h:1" }\n',
     ["reservations[0].probe.kind", "vllm, ollama, tfserving", "'olama'", "did you mean 'ollama'"]),
    ("probe-kind-tf", RES + 'probe = { kind = "TF", url = "http://h:1" }\n', ["did you mean 'tfserving'"]),
    ("probe-url-missing", RES + 'probe = { kind = "vllm" }\n', ["reservations[0].probe.url", "missing"]),
    ("probe-url-path", RES + 'probe = { kind = "vllm", url = "http://h:1/health" }\n',
     ["reservations[0].probe.url", "with no path", "/health"]),
    ("probe-url-query", RES + 'probe = { kind = "vllm", url = "http://h:1?x=1" }\n', ["with no path"]),
    ("probe-url-scheme", RES + 'probe = { kind = "vllm", url = "ftp://h:1" }\n',
     ["reservations[0].probe.url", "expected http://HOST:PORT", "'ftp://h:1'"]),
    ("probe-url-bare", RES + 'probe = { kind = "vllm", url = "h:8000" }\n', ["expected http://HOST:PORT"]),
    ("probe-url-port", RES + 'probe = { kind = "vllm", url = "http://h:99999" }\n', ["expected http://HOST:PORT"]),
    ("probe-url-port-0", RES + 'probe = { kind = "vllm", url = "http://h:0" }\n', ["expected http://HOST:PORT"]),
    ("probe-url-type", RES + 'probe = { kind = "vllm", url = 8000 }\n', ["probe.url", "expected a URL", "integer"]),
    ("probe-key", RES + 'probe = { kind = "vllm", url = "http://h:1", modle = "m" }\n',
     ["reservations[0].probe.modle", "did you mean 'model'"]),
    ("probe-timeout-bare", RES + 'probe = { kind = "vllm", url = "http://h:1", timeout = "2" }\n',
     ["reservations[0].probe.timeout", "duration"]),
    ("probe-timeout-number", RES + 'probe = { kind = "vllm", url = "http://h:1", timeout = 2 }\n',
     ["reservations[0].probe.timeout", "a timeout string", "integer 2"]),
    ("probe-timeout-short", RES + 'probe = { kind = "vllm", url = "http://h:1", timeout = "10ms" }\n',
     ["reservations[0].probe.timeout", "from 50ms to 60s", "'10ms'"]),
    ("probe-timeout-long", RES + 'probe = { kind = "vllm", url = "http://h:1", timeout = "2m" }\n',
     ["from 50ms to 60s"]),
    ("probe-tf-no-model", RES + 'probe = { kind = "tfserving", url = "http://h:1" }\n',
     ["reservations[0].probe.model", "missing", "GET /v1/models/NAME"]),
    ("probe-model", RES + 'probe = { kind = "ollama", url = "http://h:1", model = "llama 3" }\n',
     ["reservations[0].probe.model", "'llama 3' is not a model name"]),
    ("holder-no-probe", HOLDER, ["reservations[0].probe", "missing", "holder reservation needs a probe", "kind ="]),
    ("grace-static", RES + OLLAMA_PROBE + 'grace = "5m"\n', ["reservations[0].grace", "only a holder", "mode = "]),
    ("grace-bad", HOLDER + OLLAMA_PROBE + 'grace = "5 minutes"\n', ["reservations[0].grace", "duration"]),
    ("svc-not-array", V + "services = 1\n", ["services", "array of tables"]),
    ("svc-no-name", V + '[[services]]\nkind = "vllm"\nurl = "http://h:1"\n', ["services[0].name", "missing"]),
    ("svc-bad-name", SVC.replace('"v"', '"a b"'), ["services[0].name", "'a b' is not a service name"]),
    ("svc-no-kind", V + '[[services]]\nname = "v"\nurl = "http://h:1"\n', ["services[0].kind", "missing"]),
    ("svc-no-url", V + '[[services]]\nname = "v"\nkind = "vllm"\n', ["services[0].url", "missing"]),
    ("svc-creds", SVC.replace("http://h:8000", "http://admin:s3cret@h:8000"),
     ["services[0].url", "credentials", "world-readable"]),
    ("svc-dup", SVC + SVC[len(V):], ["services[1].name", "'v' is declared twice"]),
    ("svc-res-name", RES + SVC[len(V):].replace('"v"', '"ollama"'),
     ["services[0].name", "'ollama' is a reservation's name too", "probe = "]),
    ("svc-models-type", SVC + "models = [1]\n", ["services[0].models[0]", "expected a string (model name)"]),
    ("svc-models-not-list", SVC + 'models = "m"\n', ["services[0].models", "array of strings"]),
    ("svc-model-name", SVC + 'models = ["ok", ""]\n', ["services[0].models[1]", "is not a model name"]),
    ("svc-models-dup", SVC + 'models = ["m", "m"]\n', ["services[0].models[1]", "listed twice"]),
    ("svc-tf-no-models", SVC.replace('"vllm"', '"tfserving"'), ["services[0].models", "missing", 'models = ["NAME"]']),
    ("svc-key", SVC + 'model = "m"\n', ["services[0].model", "did you mean 'models'"]),
    ("svc-timeout", SVC + 'timeout = "1h"\n', ["services[0].timeout", "from 50ms to 60s"]),
    ("ctl-not-table", V + "controller = 5\n", ["controller", "expected a table ([controller])"]),
    ("ctl-key", V + '[controller]\nintervall = "1m"\n', ["controller.intervall", "did you mean 'interval'"]),
    ("ctl-interval", V + "[controller]\ninterval = 15\n", ["controller.interval", "duration string", "integer 15"]),
    ("ctl-class", V + '[controller]\nholder_class = "gold"\n', ["controller.holder_class", "'gold'", "llm, batch"]),
    ("ctl-class-preemptible", V + '[controller]\nholder_class = "batch"\n',
     ["controller.holder_class", "'batch' is preemptible", "preemptible = false"]),
    ("ctl-no-holder-class", HOLDER + OLLAMA_PROBE + CLASSES_ALL_PREEMPTIBLE,
     ["controller.holder_class", "missing", "every declared class is preemptible"]),
    ("ctl-partition-name", V + '[controller]\nholder_partition = "a b"\n', ["controller.holder_partition", "'a b'"]),
    ("ctl-partition", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1"]\n[controller]\nholder_partition = "q"\n',
     ["controller.holder_partition", "'q' is not declared", "declared: p"]),
    ("ctl-partition-class", NODES + '[[partitions]]\nname = "p"\nnodes = ["n1"]\nclasses = ["batch"]\n'
     '[controller]\nholder_partition = "p"\nholder_class = "llm"\n',
     ["controller.holder_partition", "'p' does not admit class 'llm'"]),
    ("ctl-time-limit", V + '[controller]\nholder_time_limit = "forever"\n',
     ["controller.holder_time_limit", "'forever' is not a Slurm time limit", "UNLIMITED"]),
    ("ctl-shrink", V + '[controller]\nshrink = "yes"\n', ["controller.shrink", "true or false", "string 'yes'"]),
]


@pytest.mark.parametrize(("text", "expect"), [(t, e) for _, t, e in SERVICE_ERRORS],
                         ids=[i for i, _, _ in SERVICE_ERRORS])
def test_service_errors_name_file_key_and_fix(tmp_path: Path, text: str, expect: list[str]) -> None:
    msg = error_of(tmp_path, text)
    for part in expect:
        assert part in msg, msg
    assert "\n" not in msg


def test_probe_url_credentials_are_never_echoed(tmp_path: Path) -> None:
    msg = error_of(tmp_path, SVC.replace("http://h:8000", "http://admin:s3cret@h:99999"))
    assert "s3cret" not in msg and "credentials" in msg


# --------------------------------------------------------------------------- only ConfigError ever escapes


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value)  # ints, floats and strings: TOML reads JSON's spelling of them


def toml_document(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


LEAVES = st.one_of(
    st.integers(-3, 300), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "1GiB", "0MiB", "63MiB", "2h", "whole", "mig", "fake:x", "n[1-2]", "llm", "batch", "n1",
                     "/abs", "rel", "sqlite:///x", "postgresql://u:p@h/d", "7x1g.10gb", "ollama", "static"]),
    st.text(max_size=8),
)
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["name", "index", "count", "sku", "mode", "size", "priority", "process", "x"]), inner, max_size=3),
    max_leaves=6)
BASES = [tomllib.loads(p.read_text()) for p in EXAMPLE_FILES]


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in children:
        out += paths_of(child, (*prefix, key))
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_examples_raise_only_config_errors(tmp_path: Path, data: st.DataObject) -> None:
    doc = json.loads(json.dumps(data.draw(st.sampled_from(BASES))))  # a deep copy
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths_of(doc)))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(VALUES)
        if not doc:
            break
    try:
        cfg = load(write(tmp_path, toml_document(doc)), env={})
    except ConfigError as e:
        assert str(e)
    else:
        assert isinstance(cfg, Config)


# --------------------------------------------------------------------------- documentation


ALL_KEYS = sorted({*config._TOP_KEYS, *config._POLICY_KEYS, *config._CLASS_KEYS, *cs._RESERVATION_KEYS,
                   *cs._MATCH_KEYS, *cs._PROBE_KEYS, *cs._SERVICE_KEYS, *cs._CONTROLLER_KEYS,
                   *config._NODE_KEYS, *config._GPU_KEYS, *config._PARTITION_KEYS,
                   *(key for keys in config._TABLE_KEYS.values() for key in keys)})


@pytest.mark.parametrize("key", ALL_KEYS)
def test_every_key_is_documented(key: str) -> None:
    readme = (EXAMPLES / "README.md").read_text()
    assert f"`{key}`" in readme or f"[{key}]" in readme or f"`[{key}]`" in readme
    assert key in (config.__doc__ or "")


@pytest.mark.parametrize("var", [s.env for s in config._SETTINGS])
def test_every_environment_twin_is_documented(var: str) -> None:
    assert var in (EXAMPLES / "README.md").read_text() and var in (config.__doc__ or "")
