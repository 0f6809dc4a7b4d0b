"""Coverage-guided fuzzing of the native CycleInput decoder (ledger._alloc), with atheris.

Why: CloseCycle and PreviewCycle hand every message of their stream, as the client sent its
bytes, to Rust (CycleInputDecoder.feed), which parses the protobuf wire format by hand. A
hand-written parser of untrusted bytes is where crashes, hangs and silent misreadings live;
the gRPC fuzz tests reach it only through the server, at a few hundred calls a second. Here
libFuzzer (inside atheris, from PyPI, on the stable toolchain) drives it directly.

One input is: five configuration bytes (positions_max, insurance_share, coverage_ratio,
loss and fund balance, each picked from a short list), then messages, each a 2-byte
little-endian length and that many bytes (a last, shorter one is taken as it is). Each
message is fed to one decoder; then input_digest() and allocate() run on what it holds.

Expected: the AllocationError subclasses (MalformedMessageError, ColumnLengthError,
DuplicatePositionError, RatioError, …) and PositionLimitError. A finding is anything else:
another exception, a crash or a hang of the native code, or a wrong answer, checked against
independent readers of the same bytes:
- a message the decoder accepts is one protobuf (upb, the generated CycleInput) parses, and
  both read the same header or the same rows; a refused chunk leaves the decoder unchanged;
- the digest is SHA-256 over the rows sorted by position_id, as computed here, and it is
  refused exactly when an id repeats;
- an allocation equals tests/alloc_reference.py's (exact rationals) on the same rows.

Findings are written to the findings folder (the input, and what went wrong) and the run
goes on, so that one run reports every kind it met; the script exits 1 if there is any. A
crash of the native code ends the run: libFuzzer writes the input there as crash-*.

Usage:
    python scripts/fuzz_decoder.py --seconds 60 [--corpus DIR] [--findings DIR]
    python scripts/fuzz_decoder.py --reproduce FILE    (one input, errors raised)
    python scripts/fuzz_decoder.py --seconds 60 --native-coverage  (Rust edges guide it too)

Native coverage: atheris instruments the Python code it imports (here ledger.alloc and
this file's checks); the Rust code gives libFuzzer coverage only if the extension is built
with SanitizerCoverage, which maturin's build (the installed ledger/_alloc.abi3.so) is not.
By default the search is guided by the Python side only, and still finds crashes, hangs and
uncaught exceptions of the native code and wrong answers. --native-coverage builds the crate
with cargo and rustc's sancov pass (stable rustc takes it: -C passes=sancov-module) into a
target folder of its own, and fuzzs that build: loaded by the first input, once atheris's
libFuzzer is loaded into the global namespace, so that its __sanitizer_cov_* calls reach it.
libFuzzer then reports the Rust functions it reaches (NEW_FUNC) and many more edges.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ledger, and tests.alloc_reference

CONFIG_BYTES = 5
POSITIONS_MAX_CHOICES = (0, 1, 3, 64, 100_000)
# Mostly small valid ratios, and a few that must be refused (RatioError).
RATIOS = (
    "0",
    "0.2",
    "0.5",
    "1",
    "0.3333333333333333",
    "0.000000000000000001",
    "0.999999999999999999",
    "1.5",
    "-0.1",
    "",
    "abc",
    "1e-3",
)
LOSSES = (0, 1, 7, 1000, 10**9, 2**62, 2**63 - 1, -1)
FUNDS = (0, 1, 500, 10**6, 2**63 - 1, -5)
MAX_LEN = 16384


# --- the input format ------------------------------------------------------------------------


def frame(config: bytes, messages: list[bytes]) -> bytes:
    """An input of this target: the configuration bytes, then length-prefixed messages."""
    return config.ljust(CONFIG_BYTES, b"\0") + b"".join(
        struct.pack("<H", len(m)) + m for m in messages
    )


def unframe(data: bytes) -> tuple[bytes, list[bytes]]:
    config, rest = data[:CONFIG_BYTES].ljust(CONFIG_BYTES, b"\0"), data[CONFIG_BYTES:]
    messages = []
    while rest:
        if len(rest) < 2:
            messages.append(rest)
            break
        (size,) = struct.unpack_from("<H", rest)
        messages.append(rest[2 : 2 + size])
        rest = rest[2 + size :]
    return config, messages


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _chunk(ids: list[int], accounts: list[int], pnls: list[int], packed: bool = True) -> bytes:
    """A CycleInput holding a PositionChunk, packed (proto3's way) or one value a field."""
    inner = b""
    for field, values, fmt in ((1, ids, "<Q"), (2, accounts, "<Q"), (3, pnls, "<q")):
        data = [struct.pack(fmt, v) for v in values]
        if packed and data:
            inner += _varint(field << 3 | 2) + _varint(8 * len(data)) + b"".join(data)
        elif data:
            inner += b"".join(_varint(field << 3 | 1) + d for d in data)
    return _varint(2 << 3 | 2) + _varint(len(inner)) + inner


def seeds() -> list[bytes]:
    """A few valid and nearly valid streams, so the search starts past the framing."""
    from ledger.api.v1 import insurance_pb2 as pb

    def header(cycle_id: str, currency: str) -> bytes:
        return pb.CycleInput(
            header=pb.CycleHeader(cycle_id=cycle_id, currency=currency)
        ).SerializeToString()

    typed = pb.CycleInput(
        positions=pb.PositionChunk(position_id=[11, 12], account_id=[1, 2], pnl=[-3, 900])
    ).SerializeToString()
    mixed = [-50, 400, 400, 1, 0, 2**63 - 1, -(2**63), 75]
    return [
        frame(b"\x04\x01\x04\x03\x02", [header("c1", "USDT"), typed]),
        frame(
            b"\x04\x02\x05\x03\x03",
            [header("c2", "JPY"), _chunk(list(range(1, 9)), [7] * 8, mixed)],
        ),
        frame(
            b"\x03\x01\x01\x04\x00",
            [header("c3", "KRW"), _chunk([5, 6], [1, 2], [10, 20], packed=False)],
        ),
        frame(b"\x02\x01\x04\x03\x01", [header("c4", "USDT"), _chunk([1, 1], [1, 1], [4, 4])]),
        frame(b"\x04", [b"", header("c5", "USDT") + b"\x48\x07", _chunk([9], [9, 9], [9])]),
        frame(b"\x04\x03\x02\x05\x04", [header("c6", "EUR"), _chunk([3], [3], [3]) * 2]),
        # One message, the header field twice: protobuf merges the two (cycle_id "c7" and
        # currency "BTC"), as parsers must for an embedded message.
        frame(b"\x04\x01\x03\x03\x01", [header("c7", "") + header("", "BTC"), typed]),
    ]


# --- the target ------------------------------------------------------------------------------


class Finding(Exception):
    """A wrong answer of the decoder, of a named kind (an unexpected exception is a finding
    too, of its type's kind)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def check(data: bytes) -> None:
    """One input: feed, digest, allocate, and the checks of each against the readers here;
    raises Finding or an unexpected exception."""
    from google.protobuf.message import DecodeError

    from ledger import alloc
    from ledger.api.v1 import insurance_pb2 as pb
    from tests.alloc_reference import allocate_reference

    expected = (alloc.AllocationError, alloc.PositionLimitError)
    config, messages = unframe(data)
    positions_max = POSITIONS_MAX_CHOICES[config[0] % len(POSITIONS_MAX_CHOICES)]
    share = RATIOS[config[1] % len(RATIOS)]
    coverage = RATIOS[config[2] % len(RATIOS)]
    loss = LOSSES[config[3] % len(LOSSES)]
    fund = FUNDS[config[4] % len(FUNDS)]

    decoder = alloc.CycleInputDecoder(positions_max)
    native: Any = decoder._native  # the raw (kind, …) answers of feed
    rows: list[tuple[int, int, int]] = []  # what the decoder should hold, read by protobuf
    for message in messages:
        before = len(native)
        try:
            item = native.feed(message)
        except expected:
            if len(native) != before:
                raise Finding(
                    "a refused message changed the decoder", f"{before} → {len(native)} rows"
                ) from None
            continue
        try:
            reference = pb.CycleInput.FromString(message)
        except DecodeError as error:
            raise Finding(
                "the decoder accepts bytes protobuf refuses", f"read {item!r}; protobuf: {error}"
            ) from None
        kind = reference.WhichOneof("item")
        if item[0] == "header":
            read = ("header", reference.header.cycle_id, reference.header.currency)
            if kind != "header" or tuple(item) != read:
                raise Finding(
                    "header misread", f"the decoder read {item!r}, protobuf {kind} {read!r}"
                )
        elif item[0] == "positions":
            chunk = reference.positions
            got = list(zip(chunk.position_id, chunk.account_id, chunk.pnl, strict=True))
            if kind != "positions" or item[1] != len(got):
                raise Finding(
                    "chunk misread", f"the decoder read {item!r}, protobuf {kind} {len(got)}"
                )
            rows.extend(got)
        elif kind is not None or item != ("empty",):
            raise Finding("message misread", f"the decoder read {item!r}, protobuf {kind}")
        if len(native) != len(rows) or len(native) > positions_max:
            raise Finding("rows lost or added", f"holds {len(native)} rows, expected {len(rows)}")

    ids = [r[0] for r in rows]
    try:
        digest = decoder.input_digest()
    except alloc.DuplicatePositionError:
        if len(set(ids)) == len(ids):
            raise Finding("digest", "DuplicatePositionError without a repeated id") from None
        return
    if len(set(ids)) != len(ids):
        raise Finding("digest", "a digest over a repeated position_id")
    table = b"".join(struct.pack("<QQq", *r) for r in sorted(rows))
    if digest != hashlib.sha256(table).hexdigest():
        raise Finding("digest", f"{digest} is not SHA-256 of the sorted rows")

    try:
        result = decoder.allocate(loss, fund, share, coverage)
    except expected:
        return
    want = allocate_reference(loss, fund, share, coverage, rows)
    got_rows = list(
        zip(
            result.position_id.tolist(),
            result.account_id.tolist(),
            result.pnl.tolist(),
            result.amount.tolist(),
            strict=True,
        )
    )
    summary = {k: getattr(result, k) for k in vars(want) if k != "rows"}
    if got_rows != want.rows or summary != {k: v for k, v in vars(want).items() if k != "rows"}:
        raise Finding(
            "allocation differs from the reference",
            f"allocate({loss}, {fund}, {share!r}, {coverage!r}) over {len(rows)} rows: "
            f"{summary} {got_rows[:5]} ≠ reference {want}",
        )


def kind_of(error: BaseException) -> str:
    """What a finding is, without its values: findings of one kind are kept once."""
    if isinstance(error, Finding):
        return error.kind
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: " + re.sub(r"\d+|'[^']*'|\"[^\"]*\"", "…", first)[:80]


def record(findings: Path, data: bytes, error: BaseException) -> None:
    kind = kind_of(error)
    name = hashlib.sha256(kind.encode()).hexdigest()[:12]
    path = findings / f"finding-{name}"
    if path.exists() and len(path.read_bytes()) <= len(data):
        return  # the kind is known, with an input no longer than this one
    path.write_bytes(data)
    text = "".join(traceback.format_exception(error))
    (findings / f"finding-{name}.txt").write_text(f"{kind}\ninput: {data!r}\n\n{text}")


def load_extension(path: str) -> None:
    """Makes the extension at `path` the ledger._alloc that ledger.alloc imports."""
    spec = importlib.util.spec_from_file_location("ledger._alloc", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ledger._alloc"] = module
    spec.loader.exec_module(module)


def worker(findings: Path, native_so: str | None, libfuzzer_args: list[str]) -> None:
    """The libFuzzer process: atheris with the instrumented imports, then the fuzz loop."""
    import atheris

    import tests.alloc_reference  # noqa: F401  (not instrumented: it is the oracle)

    flags = sys.getdlopenflags()
    state = {"loaded": not native_so}

    def one_input(data: bytes) -> None:
        if not state["loaded"]:
            # The instrumented extension calls libFuzzer's __sanitizer_cov_* functions from
            # its load on; atheris's core module defines them and is loaded (into the global
            # namespace: see below) only once Fuzz() runs: so the first input loads it.
            sys.setdlopenflags(flags)
            load_extension(native_so or "")
            with atheris.instrument_imports(include=["ledger.alloc"]):
                import ledger.alloc  # noqa: F401
            state["loaded"] = True
        try:
            checked(data)
        except Exception as error:  # every finding, recorded; the run goes on
            record(findings, data, error)

    if native_so:
        sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    else:
        with atheris.instrument_imports(include=["ledger.alloc"]):
            import ledger.alloc  # noqa: F401
    checked = atheris.instrument_func(check)
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


SANCOV_TARGET = ROOT / "target" / "fuzz-sancov"
SANCOV_FLAGS = " ".join(
    f"-C llvm-args=-sanitizer-coverage-{option}"
    for option in ("level=4", "inline-8bit-counters", "pc-table", "trace-compares")
)


def build_sancov() -> Path:
    """The extension built by cargo with rustc's SanitizerCoverage pass (stable rustc takes
    it as -C passes=sancov-module). --target keeps the flags off build scripts and proc
    macros, which would not link without libFuzzer; the build has its own target folder."""
    env = dict(os.environ, RUSTFLAGS=f"-C passes=sancov-module {SANCOV_FLAGS}")
    triple = subprocess.run(
        ["rustc", "--print", "host-tuple"], capture_output=True, text=True, check=True
    ).stdout.strip()
    command = ["cargo", "build", "--locked", "--release", "-p", "rust_alloc", "--lib"]
    command += ["--features", "python,pyo3/extension-module", "--target", triple]
    command += ["--target-dir", str(SANCOV_TARGET)]
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return SANCOV_TARGET / triple / "release" / "librust_alloc.so"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    parser.add_argument("--corpus", help="the corpus folder (kept); default a temporary one")
    parser.add_argument("--findings", help="where findings go (default: beside the corpus)")
    parser.add_argument(
        "--native-coverage",
        action="store_true",
        help=f"build the extension with SanitizerCoverage (cargo, into {SANCOV_TARGET}) and "
        "fuzz that build, so that the Rust code's edges guide the search",
    )
    parser.add_argument("--native-so", help="a ledger._alloc built with SanitizerCoverage")
    parser.add_argument("--reproduce", help="run one input file, raising what it raises")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        worker(Path(args.findings), args.native_so, [a for a in rest if a != "--"])
        return 0
    if args.reproduce:
        check(Path(args.reproduce).read_bytes())
        print("no finding")
        return 0
    native_so = args.native_so
    if args.native_coverage and not native_so:
        native_so = str(build_sancov())
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-decoder-"))
    corpus = Path(args.corpus) if args.corpus else scratch / "corpus"
    findings = Path(args.findings) if args.findings else scratch / "findings"
    status = run(args.seconds, corpus, findings, native_so)
    if not args.corpus:
        shutil.rmtree(corpus, ignore_errors=True)
        print("(the corpus was temporary: --corpus DIR keeps it)")
    if status == 0 or findings.parent != scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return status


def run(seconds: int, corpus: Path, findings: Path, native_so: str | None) -> int:
    """Starts the libFuzzer process for `seconds`, then says what it did."""
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    for n, seed in enumerate(seeds()):
        (corpus / f"seed-{n}").write_bytes(seed)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    command += ["--findings", str(findings)]
    if native_so:
        command += ["--native-so", str(Path(native_so).resolve())]
    command += [
        "--",
        f"-max_total_time={seconds}",
        "-print_final_stats=1",
        f"-max_len={MAX_LEN}",
        "-timeout=30",  # one input running longer is a hang: a finding
        "-rss_limit_mb=4096",
        f"-artifact_prefix={findings}/",
        str(corpus),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 300)
    log = done.stderr
    executions = re.search(r"stat::number_of_executed_units: (\d+)", log)
    final = re.findall(r"#\d+\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", log)
    modules = re.findall(r"INFO: Loaded (\d+) modules\s+\((\d+) inline 8-bit counters\)", log)
    inputs = [p for p in corpus.iterdir() if p.is_file()]
    print(f"executions: {executions.group(1) if executions else 0}")
    print(
        f"corpus: {len(inputs)} inputs ({sum(p.stat().st_size for p in inputs)} bytes) in {corpus}"
    )
    if final:
        cov, ft, corp, size = final[-1]
        print(f"coverage: {cov} edges, {ft} features; in-memory corpus {corp} inputs ({size})")
    for count, counters in modules:
        print(f"instrumented: {count} module(s), {counters} inline 8-bit counters")
    print(f"native coverage: {'sancov build ' + native_so if native_so else 'none (maturin)'}")
    reports = sorted(findings.glob("finding-*.txt"))
    crashes = sorted(p for p in findings.iterdir() if re.match(r"(crash|timeout|oom)-", p.name))
    print(f"findings: {len(reports) + len(crashes)} in {findings}")
    for report in reports:
        print("--- " + report.read_text()[:3000])
    for crash in crashes:
        print(f"--- {crash.name}: {crash.read_bytes()!r}"[:3000])
    if done.returncode != 0 and not crashes:
        print(log[-5000:])
    return 1 if done.returncode != 0 or reports or crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
