"""job_submit.lua and cli_filter.lua: rendered from the spec grammar, run by a real Lua 5.1, compared with Python.

The agreement test renders the Lua for every inventory, runs ``tests/data/lua_driver.lua`` *once*
over the whole corpus (``tests/data/lua_corpus.txt``, ``tests/data/spec_corpus.txt`` and a seeded
family of sizes and durations), and compares each case field by field with the Python twin
(:func:`lua.decide_submit`, :func:`lua.decide_modify`): accept/reject, the user's message, the
GRES, QoS and partition set, the canonical comment, the modify log line. Each corpus line also
carries a coarse expectation of its own, so the two cannot agree on a wrong answer unnoticed.

Golden files of the rendered Lua live in tests/data/golden/<inventory>/{job_submit,cli_filter}.lua
(rendered as ``gpuarb render`` does for test_render's goldens: QoS in use except on the test
cluster, which runs without slurmdbd); regenerate them with
``GPUARB_UPDATE_GOLDEN=1 pytest tests/test_lua.py`` and read the diff.
Lua 5.1 comes from Debian's ``lua5.1`` package (``apt-get install lua5.1``).
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from slurm_gpuarb import lua, spec
from slurm_gpuarb.config import Config, load
from slurm_gpuarb.errors import LeaseSpecError, RenderError
from slurm_gpuarb.model import LeaseSpec

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
GOLDEN = DATA / "golden"
DRIVER = DATA / "lua_driver.lua"
LUA = shutil.which("lua5.1") or "/usr/bin/lua5.1"
INVENTORIES = {
    "docker-slurm": REPO / "docker-slurm" / "inventory.toml",
    "dgx-h100": REPO / "templates" / "examples" / "dgx-h100.toml",
    "mixed-cluster": REPO / "templates" / "examples" / "mixed-cluster.toml",
    "workstation-3090ti": REPO / "templates" / "examples" / "workstation-3090ti.toml",
}
EDGE = DATA / "lua_edge.toml"  # corners the examples lack: MPS, mixed GPU sizes, a Lua-keyword class
SHORT = {"lab": "docker-slurm", "dgx": "dgx-h100", "mixed": "mixed-cluster", "ws": "workstation-3090ti",
         "edge": "edge"}
JOB_FIELDS = tuple(f.name for f in fields(lua.JobRequest))
needs_lua = pytest.mark.skipif(not Path(LUA).is_file(), reason="needs Lua 5.1: apt-get install lua5.1")


# --------------------------------------------------------------------------- the corpus

_ESCAPE_RE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|R\{(\d+)\}\{([^}]*)\}|G\{(\d+)\}\{(\d+)\}|(.))", re.DOTALL)
_SIMPLE = {"t": b"\t", "n": b"\n", "r": b"\r", "s": b" ", "\\": b"\\"}


def unescape(text: str) -> bytes:
    r"""Corpus escapes: ``\xHH``, ``\t \n \r \s \\``, ``\R{N}{TEXT}`` (TEXT N times) and ``\G{SEED}{N}``
    (N seeded pseudo-random bytes 0x01..0xff: Slurm hands a comment over as a C string, so no NUL)."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE_RE.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        if m.group(1):
            out.append(int(m.group(1), 16))
        elif m.group(2):
            out += unescape(m.group(3)) * int(m.group(2))
        elif m.group(4):
            out += bytes(b % 255 + 1 for b in random.Random(int(m.group(4))).randbytes(int(m.group(5))))
        else:
            out += _SIMPLE[m.group(6)]
        pos = m.end()
    return bytes(out + text[pos:].encode("utf-8"))


@dataclass(frozen=True)
class Case:
    id: str
    inventory: str  # a SHORT name, "+qos" for use_qos
    op: str  # submit | cli | modify | submit_broken | modify_broken
    expect: str  # accept | none | reject | allow | deny, optionally ":fragment"; "" for none at all
    fields: dict[str, bytes]


def _lua_corpus() -> list[Case]:
    cases = []
    for n, raw in enumerate((DATA / "lua_corpus.txt").read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        parts = raw.split(" | ")
        assert 4 <= len(parts) <= 5, f"lua_corpus.txt:{n}: expected 4 or 5 ' | '-separated fields"
        inventory, op, expect, comment = (p.strip() if i < 3 else p for i, p in enumerate(parts[:4]))
        values = {} if comment == "~" else {"comment": unescape(comment)}
        for item in (parts[4].split() if len(parts) == 5 else []):
            key, _, value = item.partition("=")
            values[key] = unescape(value)
        cases.append(Case(f"L{n}", inventory, op, expect, values))
        if op == "submit":
            # cli_filter rewrites nothing: only a refusal's fragment (its message) carries over.
            # Its --gpus* options are bare counts, so a tres_per_* value there always asks for GPUs.
            cli_expect = expect if expect.startswith("reject") else expect.partition(":")[0]
            if any(k.startswith("tres_per_") for k in values):
                cli_expect = ""
            cases.append(Case(f"L{n}cli", inventory, "cli", cli_expect, values))
    return cases


def _spec_corpus() -> list[Case]:
    cases = []
    for n, raw in enumerate((DATA / "spec_corpus.txt").read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        kind, comment, *rest = raw.split("\t")
        expect = {"none": "none", "error": f"reject:{rest[0] if rest else ''}"}.get(kind, "")
        cases.append(Case(f"S{n}", "ws", "submit", expect, {"comment": comment.encode("utf-8")}))
    return cases


def _generated() -> list[Case]:
    """Seeded sizes and durations near every digit-run limit, in every unit case: the Lua's exact
    arithmetic (ceil division below 2^53, the absurd-size limit) against Python's integers."""
    rng = random.Random(4)
    units = ["MiB", "gib", "TiB", "MB", "gB", "TB", "mb", "Tib", "XB", "m", "MIBS"]
    cases = []
    for i in range(200):
        whole = rng.choice([0, 1, 4, 9, 99, 10**rng.randint(1, 9) - rng.randint(0, 2), rng.randint(1, 99_999),
                            rng.randint(1, 4_500_000)])
        frac = rng.choice(["", "", "", ".5", ".05", ".999", ".0001", f".{rng.randint(0, 999):03d}",
                           f".{rng.randint(0, 99)}"])
        comment = f"gpuarb: vram={whole}{frac}{rng.choice(units)}"
        cases.append(Case(f"G{i}", "lab", "submit", "", {"comment": comment.encode(), "partition": b"batch"}))
    for i in range(100):
        units_used = sorted(rng.sample("dhms", rng.randint(1, 4)), key="dhms".index)
        if rng.random() < 0.2:
            rng.shuffle(units_used)  # sometimes out of order
        ttl = "".join(f"{rng.randint(0, 10**rng.randint(1, 7) - 1)}{u}" for u in units_used)
        cases.append(Case(f"D{i}", "ws", "submit", "", {"comment": f"gpuarb: vram=1GiB ttl={ttl}".encode()}))
    # "did you mean": mutated keys, enum values and class names through difflib's twin.
    words = [*spec.KEYS, *spec.SHARE_CHOICES, *spec.ENGINE_CHOICES, "batch", "llm", "1g.10gb", "end", "svc"]
    for i in range(240):
        word = list(rng.choice(words))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(word) + 1)
            edit = rng.choice("dis")
            if edit == "d" and len(word) > 1:
                del word[min(at, len(word) - 1)]
            else:
                word[at:at + (edit == "s")] = rng.choice("abcdeglmnoprstuvAEGMPRS_-.19")
        text = "".join(word)
        comment = rng.choice([f"gpuarb: {text}=1", f"gpuarb/1: {text}=1", f"gpuarb: vram=1GiB share={text}",
                              f"gpuarb: vram=1GiB engine={text}", f"gpuarb: vram=1GiB prio={text}",
                              f"gpuarb: mig={text}"])
        cases.append(Case(f"W{i}", rng.choice(["lab", "edge"]), "submit", "", {"comment": comment.encode()}))
    return cases


CASES = _lua_corpus() + _spec_corpus() + _generated()


def _inventory(short: str) -> Path:
    return EDGE if short == "edge" else INVENTORIES[SHORT[short]]


def _parse(text: str) -> LeaseSpec:
    lease = spec.parse(text)
    assert lease is not None
    return lease


@functools.cache
def _tables(name: str) -> lua.SubmitTables:
    base, _, qos = name.partition("+")
    return lua.submit_tables(load(_inventory(base), env={}), use_qos=qos == "qos")


# --------------------------------------------------------------------------- running the Lua once


@pytest.fixture(scope="module")
def lua_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str | None]]:
    if not Path(LUA).is_file():
        pytest.skip("needs Lua 5.1: apt-get install lua5.1")
    out = tmp_path_factory.mktemp("lua")
    args = []
    for name in sorted({c.inventory for c in CASES}):
        base, _, qos = name.partition("+")
        files = lua.render_lua(load(_inventory(base), env={}), use_qos=qos == "qos")
        for fname, kind in (("job_submit.lua", "submit"), ("cli_filter.lua", "cli")):
            path = out / f"{name}-{fname}"
            path.write_text(files[fname], encoding="utf-8")
            args.append(f"{name}:{kind}={path}")
    lines = []
    for c in CASES:
        cells = [c.id, c.inventory, c.op] + [f"{k}={v.hex()}" for k, v in c.fields.items()]
        lines.append("\t".join(cells))
    proc = subprocess.run([LUA, str(DRIVER), *args], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    results: dict[str, dict[str, str | None]] = {}
    for row in proc.stdout.splitlines():
        case_id, *cells = row.split("\t")
        parsed: dict[str, str | None] = {}
        for cell in cells:
            key, _, value = cell.partition("=")
            parsed[key] = value if key == "rc" else (
                None if value == "-" else bytes.fromhex(value).decode("utf-8", "surrogateescape"))
        results[case_id] = parsed
    assert len(results) == len(CASES)
    return results


def expected(case: Case) -> dict[str, str | None]:
    """The Python twin's answer, in the driver's terms."""
    f = {k: v.decode("utf-8", "surrogateescape") for k, v in case.fields.items()}
    t = _tables(case.inventory)
    if case.op in ("submit", "cli"):
        r = lua.decide_submit(t, lua.JobRequest(**{k: f.get(k) for k in JOB_FIELDS}), cli=case.op == "cli")
        out: dict[str, str | None] = {"rc": "accept" if r.accepted else "reject"}
        if case.op == "cli":
            return out | {"error": r.message}
        return out | {"user": r.message, "comment": r.comment if r.comment is not None else f.get("comment"),
                      "tres_per_node": r.tres_per_node or f.get("tres_per_node"), "qos": r.qos or f.get("qos"),
                      "partition": r.partition or f.get("partition"), "changed": str(r.comment is not None)}
    uid = int(f.get("uid", "1000"))
    m = lua.decide_modify(t, lua.ModifyRequest(uid, f.get("rec_comment"), f.get("rec_partition"),
                                               **{k: f.get(k) for k in JOB_FIELDS if k not in ("qos",)}))
    info = "" if m.allowed else f"gpuarb: job_modify: job={f.get('rec_job_id', '42')} uid={uid} refused: {m.reason}"
    return {"rc": "accept" if m.allowed else "reject", "info": info,
            "comment": m.comment if m.comment is not None else f.get("comment")}


def _check_coarse(case: Case, want: dict[str, str | None]) -> None:
    kind, _, fragment = case.expect.partition(":")
    if not kind:
        return
    rc = {"accept": "accept", "none": "accept", "allow": "accept", "reject": "reject", "deny": "reject"}[kind]
    assert want["rc"] == rc, f"{case.id}: expected {kind}, the Python twin says {want}"
    if case.op == "submit" and kind in ("accept", "none"):
        assert want["changed"] == str(kind == "accept"), f"{case.id}: expected {kind}: {want}"
    if fragment:
        text = " ".join(v for k, v in want.items() if v is not None and k != "rc")
        assert fragment in text, f"{case.id}: {fragment!r} not in {want}"


@needs_lua
@pytest.mark.parametrize("case", [c for c in CASES if not c.op.endswith("_broken")], ids=lambda c: c.id)
def test_lua_agrees_with_python(case: Case, lua_results: dict[str, dict[str, str | None]]) -> None:
    got = lua_results[case.id]
    assert "internal error" not in (got.get("info") or "") + (got.get("error") or ""), got
    want = expected(case)
    _check_coarse(case, want)
    for key, value in want.items():
        if key != "changed":
            assert got[key] == value, f"{case.id} {key}: Lua {got[key]!r} != Python {value!r}"


@needs_lua
@pytest.mark.parametrize("case", [c for c in CASES if c.op.endswith("_broken")], ids=lambda c: c.id)
def test_internal_errors(case: Case, lua_results: dict[str, dict[str, str | None]]) -> None:
    """A Lua error (here: a job_desc whose every read raises) is logged; submit then accepts the job
    unchanged, modify refuses an ordinary user and lets root through."""
    got = lua_results[case.id]
    kind, _, fragment = case.expect.partition(":")
    assert got["rc"] == {"accept": "accept", "allow": "accept", "reject": "reject", "deny": "reject"}[kind]
    assert fragment in (got["info"] or "")
    assert got["comment"] is None and got["tres_per_node"] is None


def test_corpus_is_big_and_varied() -> None:
    corpus = [c for c in CASES if c.id.startswith("L") and not c.id.endswith("cli")]
    assert len(corpus) >= 300
    comments = [c.fields.get("comment", b"") for c in corpus]
    assert any(len(c) >= 100_000 for c in comments)
    assert any(len(c) >= 100_000 and (b"\xff" in c or b"\x80" in c) for c in comments)  # binary garbage
    assert {c.op for c in corpus} >= {"submit", "modify", "cli", "submit_broken", "modify_broken"}
    assert {c.inventory.partition("+")[0] for c in corpus} == set(SHORT)


# --------------------------------------------------------------------------- golden files and rendering


@pytest.mark.parametrize("name", sorted(INVENTORIES))
def test_golden(name: str) -> None:
    # As test_render's golden options: the test cluster runs without slurmdbd, the examples with it.
    rendered = lua.render_lua(load(INVENTORIES[name], env={}), use_qos=name != "docker-slurm")
    assert set(rendered) == {"job_submit.lua", "cli_filter.lua"}
    for fname, text in rendered.items():
        golden = GOLDEN / name / fname
        if os.environ.get("GPUARB_UPDATE_GOLDEN") == "1":
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text, encoding="utf-8")
        assert golden.is_file(), f"no golden {golden}: run GPUARB_UPDATE_GOLDEN=1 pytest tests/test_lua.py"
        assert text == golden.read_text(encoding="utf-8"), f"{name}/{fname} differs from its golden file"


@pytest.mark.parametrize("name", sorted(INVENTORIES))
def test_rendered_lua_uses_no_io_os_or_loading(name: str) -> None:
    for text in lua.render_lua(load(INVENTORIES[name], env={}), use_qos=True).values():
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())  # strings hold no "--"
        for word in ("io", "os", "require", "dofile", "loadfile", "loadstring", "load", "debug", "package"):
            assert re.search(rf"\b{word}\b\s*[.(]", code) is None, f"{name}: uses {word}"
        assert "log_user(\"%s\"" in text or "log_user" not in code
        assert re.search(r"log_(user|info|error)\((?!\"%s\")", code) is None, "a log call without \"%s\""


def test_site_template_overrides_by_relative_path(tmp_path: Path) -> None:
    site = tmp_path / "etc" / "slurm"
    site.mkdir(parents=True)
    (site / "cli_filter.lua.j2").write_text("-- site cli_filter for {{ source }}\n")
    files = lua.render_lua(load(INVENTORIES["docker-slurm"], env={}), template_dir=tmp_path, source="x.toml")
    assert files["cli_filter.lua"] == "-- site cli_filter for x.toml\n"
    assert "slurm_job_submit" in files["job_submit.lua"]


def test_missing_template_value_is_an_error(tmp_path: Path) -> None:
    site = tmp_path / "etc" / "slurm"
    site.mkdir(parents=True)
    (site / "cli_filter.lua.j2").write_text("{{ no_such_value }}\n")
    with pytest.raises(RenderError, match=r"cli_filter\.lua\.j2 failed to render"):
        lua.render_lua(load(INVENTORIES["docker-slurm"], env={}), template_dir=tmp_path)


def test_lua_literal() -> None:
    assert lua.lua_literal(None) == "nil"
    assert lua.lua_literal([True, 3, "a\"b\\c\n…"]) == '{true, 3, "a\\034b\\092c\\010\\226\\128\\166"}'
    keyed = lua.lua_literal({"end": 1, "ok_1": 2, 0: True, "a-b": 3})
    assert keyed == '{["end"] = 1, ok_1 = 2, [0] = true, ["a-b"] = 3}'
    wrapped = lua.lua_literal({"k": "x" * 200})
    assert wrapped.startswith("{\n  k = ") and wrapped.endswith(",\n}")
    with pytest.raises(RenderError):
        lua.lua_literal(1.5)


# --------------------------------------------------------------------------- the tables


def test_shape_limits_are_the_spec_regexes() -> None:
    """The digit-run lengths the Lua checks are exactly those of spec's regexes."""
    def edge(regex: re.Pattern[str], make: object, n: int) -> None:
        assert callable(make)
        assert regex.fullmatch(make(n)) is not None and regex.fullmatch(make(n + 1)) is None

    edge(spec.SIZE_RE, lambda n: "1" * n + "MiB", lua.SIZE_WHOLE_DIGITS)
    edge(spec.SIZE_RE, lambda n: "1." + "5" * n + "MiB", lua.SIZE_FRAC_DIGITS)
    edge(spec.SIZE_RE, lambda n: "1" + "M" * n, lua.SIZE_UNIT_LETTERS[1])
    assert spec.SIZE_RE.fullmatch("1M") is None and spec.SIZE_RE.fullmatch("1MB") is not None
    edge(spec.PERCENT_RE, lambda n: "1" * n + "%", lua.PERCENT_DIGITS)
    edge(spec.INT_RE, lambda n: "1" * n, lua.INT_DIGITS)
    edge(spec.DURATION_RE, lambda n: "1" * n + "s", lua.DURATION_DIGITS)
    edge(spec.DURATION_RE, lambda n: "1s" * n, lua.DURATION_PARTS)
    edge(spec.VERSION_RE, lambda n: "1" * n, lua.VERSION_DIGITS)
    edge(spec.MARKER_RE, lambda n: "gpuarb/" + "v" * n + ":", lua.MARKER_VERSION_CHARS)


def test_example_is_the_parsers() -> None:
    with pytest.raises(LeaseSpecError) as e:
        spec.parse("gpuarb:")
    assert str(e.value).endswith(lua.EXAMPLE)


def test_tables_of_the_test_cluster() -> None:
    t = _tables("lab")
    shard, mig, batch = t.partitions["shard"], t.partitions["mig"], t.partitions["batch"]
    # n2: 24564 total - 354 driver - 1024 margin - 12288 Ollama = 10898 MiB -> 21 shards of 512 MiB
    assert (shard.mode, shard.shard_count, shard.usable_mib, shard.gpu_total_mib) == ("shard", 21, 10898, 24564)
    assert [(o.name, o.memory_mib) for o in mig.mig] == [("1g.10gb", 9984)] and mig.max_gpus == 1
    # batch serves n1's 8 whole H100s and n2's shard GPU (handed out whole): % resolves on the smaller
    assert (batch.mode, batch.gpu_total_mib, batch.usable_mib, batch.max_gpus) == ("whole", 24564, 80023, 8)
    assert t.class_partition == {"batch": "batch", "llm": "llm"} and t.implicit is None


def test_tables_of_the_examples() -> None:
    dgx = _tables("dgx")
    assert dgx.class_partition == {"llm": "llm", "batch": "batch"}  # the first partition admitting a class
    assert dgx.partitions["batch"].shard_count == 78 and dgx.quantum_mib == 1024
    mixed = _tables("mixed").partitions["batch"]
    # A100 80GB: 81920 - 557 - 1024 = 80339 MiB; the vLLM reservation only lowers gpu-h01's GPU 0
    assert (mixed.shard_count, mixed.usable_mib, mixed.gpu_total_mib) == (78, 80339, 81559)
    ws = _tables("ws")
    assert ws.partitions == {} and ws.implicit is not None and ws.implicit.shard_count == 21


def _cfg(tmp_path: Path, body: str) -> Config:
    path = tmp_path / "gpuarb.toml"
    path.write_text("version = 1\n" + textwrap.dedent(body))
    return load(path, env={})


def test_no_partitions_needs_one_gpu_mode(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, """
        [[nodes]]
        name = "n1"
        gpus = [{ index = 0, sku = "h100-80g", mode = "shard" }, { index = 1, sku = "h100-80g" }]
    """)
    with pytest.raises(RenderError, match=r"no \[\[partitions\]\].*shard, whole"):
        lua.render_lua(cfg)
    with pytest.raises(RenderError, match="no GPUs"):
        lua.render_lua(_cfg(tmp_path, ""))


def test_mig_profiles_are_smallest_first_with_their_least_memory(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, """
        [[nodes]]
        name = "a"
        gpus = [{ index = 0, sku = "a100-80g", mode = "mig", mig = ["3g.40gb", "1g.20gb", "2x1g.10gb"] }]
        [[nodes]]
        name = "h"
        gpus = [{ index = 0, sku = "h100-80g", mode = "mig", mig = ["7x1g.10gb"] }]
        [[partitions]]
        name = "mig"
        nodes = ["a", "h"]
        mode = "mig"
    """)
    part = lua.submit_tables(cfg).partitions["mig"]
    assert [(o.name, o.memory_mib) for o in part.mig] == [("1g.10gb", 9728), ("1g.20gb", 19968), ("3g.40gb", 40192)]
    t = lua.submit_tables(cfg)
    assert lua.map_lease(t, _parse("gpuarb: vram=11GiB")).gres == "gres:gpu:1g.20gb:1"
    assert lua.map_lease(t, _parse("gpuarb: mig=any")).gres == "gres:gpu:1g.10gb:1"


def test_only_privileged_uids_may_change_shards() -> None:
    t = _tables("lab")
    canonical = "gpuarb/1: vram=6144MiB shards=12"
    for count in (20, 8):
        change = lua.ModifyRequest(1000, canonical, "shard", tres_per_node=f"gres:shard:{count}")
        assert not lua.decide_modify(t, change).allowed
        as_root = lua.ModifyRequest(0, canonical, "shard", tres_per_node=f"gres:shard:{count}")
        assert lua.decide_modify(t, as_root).allowed
    assert lua.decide_modify(t, lua.ModifyRequest(1000, canonical, "shard", gres="shard:12")).allowed
