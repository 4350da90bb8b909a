"""Generated families of hostile files (issue 13): every variant is unsafe, refused, and inert.

``tests/security/corpus_gen.py`` expands each class of the issue into hundreds of variants over
object-building opcodes, protocols, memo use, nesting, byte spellings and containers. For every
file: ``modelkit.scan`` says ``unsafe``, ``open_model`` and ``inspect`` raise ``UnsafeFileError``
or ``FormatError``, and the marker never appears. A sample of each family is first proven live:
the real loader (``torch.load(weights_only=False)``, ``pickle.loads`` or a ``pickle.load`` loop)
runs it in a child process and the marker appears; a family with no live member would test nothing.

Tests run per family, over all its files, and list every variant that gets through, so one
failure shows the shape of the gap. ``fixtures/corpus.py`` (the bench corpus) is checked here too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import modelkit
from fixtures import corpus
from modelkit.cli.main import cli
from modelkit.errors import FormatError, UnsafeFileError
from tests.security import corpus_gen
from tests.security.corpus_gen import FAMILIES, Sample

Corpus = dict[str, list[tuple[Sample, Path]]]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Corpus, str]]:
    folder = tmp_path_factory.mktemp("generated")
    marker = (folder / "PWNED").as_posix()  # payloads take a plain path: no backslash on Windows (check_marker)
    by_family: Corpus = {f: [] for f in FAMILIES}
    for sample, path in corpus_gen.write_corpus(str(folder), marker):
        by_family[sample.family].append((sample, Path(path)))
    yield by_family, marker
    assert not os.path.exists(marker), "a hostile payload was executed in the test process"


def _report(wrong: list[tuple[Sample, str]], total: int) -> str:
    """The variants that got through, grouped by what modelkit said, with the bytes of the smallest one."""
    groups: dict[str, list[Sample]] = {}
    for sample, why in wrong:
        groups.setdefault(re.sub(r"\d+", "N", why)[:160], []).append(sample)
    lines = [f"{len(wrong)} of {total} variants got through, in {len(groups)} groups:"]
    for why, samples in sorted(groups.items(), key=lambda g: -len(g[1])):
        lines.append(f"  {len(samples):4} x {why}")
        lines.append(f"         e.g. {samples[0].filename}")
    smallest = min(wrong, key=lambda w: len(w[0].data))[0]
    if len(smallest.data) <= 800:
        lines.append(f"smallest ({smallest.filename}, read by {smallest.loader}): {smallest.data.hex()}")
    return "\n".join(lines)


def _findings(path: Path) -> tuple[str, str]:
    try:
        report = modelkit.scan(path).files[0]
    except Exception as exc:  # noqa: BLE001 - a scanner that crashes has let the file through
        return "crashed", f"scan raised {type(exc).__name__}: {exc}"
    findings = sorted(report.findings, key=lambda f: f.severity == "info")  # the telling ones first
    text = "; ".join(f"{f.rule} {f.message}" for f in findings[:2]) or "no findings"
    return report.verdict, text.replace(str(path), "<file>")


def test_every_family_has_variants_and_live_members(generated: tuple[Corpus, str]) -> None:
    """Hundreds of variants per class of the issue; each family has members whose payload runs."""
    by_family, _marker = generated
    for family in FAMILIES:
        samples = [s for s, _p in by_family[family]]
        assert samples, f"{family}: no variants"
        assert any(s.live for s in samples), f"{family}: no live variant, so it tests nothing"
    total = sum(len(v) for v in by_family.values())
    assert total >= 900, total
    assert len(by_family["setstate-build"]) + len(by_family["setstate-torch"]) >= 200  # section 1
    assert len(by_family["runtime-bytes"]) >= 100


def _spread(samples: list[Sample], k: int = 3) -> list[Sample]:
    """Up to k live samples, from different containers/loaders where the family has them."""
    live = [s for s in samples if s.live]
    picked: list[Sample] = []
    seen: set[str] = set()
    for s in live[::-1] + live:  # the last variants first: they differ most from the first ones
        key = s.name.rsplit("-", 1)[-1] + s.loader
        if key not in seen and len(picked) < k:
            picked.append(s)
            seen.add(key)
    for s in live:
        if len(picked) >= k:
            break
        if s not in picked:
            picked.append(s)
    return picked


def test_family_payloads_are_live(tmp_path: Path) -> None:
    """The real loader runs a spread of each family's live variants: the marker appears (in a child).

    ``corpus_gen.check_live`` runs ``torch.load(weights_only=False)``, ``pickle.loads`` or a loop of
    ``pickle.load`` in one child process (one torch import), in a scratch folder.
    """
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    marker = (live_dir / "PWNED").as_posix()
    try:
        corpus_gen.check_marker(marker)
    except ValueError:  # too long (macOS temp folders): its name, relative to the loader child's cwd (live_dir)
        marker = "PWNED"
    samples = corpus_gen.generate(marker)
    picked = []
    for family in FAMILIES:
        spread = _spread([s for s in samples if s.family == family])
        assert spread, f"{family}: no live variant"
        picked += spread
    dead = corpus_gen.check_live(picked, str(live_dir))
    assert not dead, f"payloads that did not run under their loader: {dead}"
    assert not os.path.exists(live_dir / "PWNED")


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_calls_every_variant_unsafe(generated: tuple[Corpus, str], family: str) -> None:
    """``modelkit.scan`` says ``unsafe`` for every variant (not ``safe``, ``suspicious`` or ``error``)."""
    by_family, marker = generated
    wrong = []
    for sample, path in by_family[family]:
        verdict, findings = _findings(path)
        if verdict != "unsafe":
            wrong.append((sample, f"{verdict} ({findings})"))
    assert not os.path.exists(marker), "a hostile payload was executed by modelkit"
    if wrong:
        pytest.fail(_report(wrong, len(by_family[family])), pytrace=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_readers_refuse_every_variant(generated: tuple[Corpus, str], family: str) -> None:
    """``open_model`` and ``inspect`` raise UnsafeFileError or FormatError for every variant."""
    by_family, marker = generated
    wrong = []
    for sample, path in by_family[family]:
        for name, read in (("open_model", modelkit.open_model), ("inspect", modelkit.inspect)):
            try:
                result = read(path)
            except (UnsafeFileError, FormatError):
                continue
            except Exception as exc:  # noqa: BLE001 - any other outcome is the finding
                message = str(exc).replace(str(path), "<file>")
                wrong.append((sample, f"{name} raised {type(exc).__name__}: {message}"))
                break
            if name == "open_model":
                result.close()
            wrong.append((sample, f"{name} read it without an error"))
            break
    assert not os.path.exists(marker), "a hostile payload was executed by modelkit"
    if wrong:
        pytest.fail(_report(wrong, len(by_family[family])), pytrace=False)


def test_cli_inspect_and_convert_refuse_a_sample_of_each_family(generated: tuple[Corpus, str],
                                                                tmp_path: Path) -> None:
    """``modelkit inspect`` and ``modelkit convert`` (also with ``--ignore-scan``) exit non-zero; nothing is written."""
    by_family, marker = generated
    runner = CliRunner()
    wrong = []
    for family in FAMILIES:
        for sample, path in _pick_for_cli(by_family[family]):
            result = runner.invoke(cli, ["inspect", str(path)])
            if result.exit_code == 0:
                wrong.append((sample, "modelkit inspect exited 0"))
            for extra in ([], ["--ignore-scan"]):
                out = tmp_path / f"{sample.name[:80]}{'-ignored' if extra else ''}.safetensors"
                result = runner.invoke(cli, ["convert", str(path), "-o", str(out), *extra])
                if result.exit_code == 0 or out.exists():
                    wrong.append((sample, f"modelkit convert {' '.join(extra)} exited {result.exit_code}, "
                                          f"wrote {out.exists()}"))
    assert not os.path.exists(marker), "a hostile payload was executed by modelkit"
    if wrong:
        pytest.fail("\n".join(f"{s.filename}: {why}" for s, why in wrong), pytrace=False)


def _pick_for_cli(pairs: list[tuple[Sample, Path]]) -> list[tuple[Sample, Path]]:
    """Two per family: the first variant and one from the middle (another container, as a rule)."""
    return [pairs[0], pairs[len(pairs) // 2]] if len(pairs) > 1 else pairs


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Sample, Path]]:
    folder = tmp_path_factory.mktemp("twins")
    out = []
    for sample in corpus_gen.benign_twins():
        path = folder / sample.filename
        path.write_bytes(sample.data)
        out.append((sample, path))
    return out


def test_benign_twins_scan_safe(twins: list[tuple[Sample, Path]]) -> None:
    """The generator's parts without the hostile part (tensors, placeholders and OrderedDicts with a
    plain data dict, every key and dict spelling, memo style, nesting and container) scan ``safe``:
    the variants above are flagged for what is hostile in them, not for how they are spelled."""
    wrong = []
    for sample, path in twins:
        verdict, findings = _findings(path)
        if verdict != "safe":
            wrong.append((sample, f"{verdict} ({findings})"))
    if wrong:
        pytest.fail(_report(wrong, len(twins)), pytrace=False)


def test_a_safe_scan_means_the_reader_reads_it(twins: list[tuple[Sample, Path]]) -> None:
    """A file that scans ``safe`` but that no reader can load is a contradiction (issue 13, "Also"):
    each benign twin that scans safe opens and yields its one tensor (its loader reads them all)."""
    wrong = []
    for sample, path in twins:
        if _findings(path)[0] != "safe":
            continue  # test_benign_twins_scan_safe reports it
        try:
            with modelkit.open_model(path) as model:
                if len(model) != 1:
                    wrong.append((sample, f"open_model read {len(model)} tensors, not 1"))
        except Exception as exc:  # noqa: BLE001 - any error is the finding
            message = str(exc).replace(str(path), "<file>")
            wrong.append((sample, f"open_model raised {type(exc).__name__}: {message}"))
    if wrong:
        pytest.fail(_report(wrong, len(twins)), pytrace=False)


# -- the earlier corpus (fixtures/corpus.py, which bench/bench_scan.py uses) ------------------------


@pytest.fixture(scope="module")
def earlier_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str], str]:
    folder = tmp_path_factory.mktemp("earlier")
    marker = str(folder / "PWNED")
    hostile = corpus.build_hostile(str(folder / "hostile"), marker)
    return hostile, corpus.build_benign(str(folder / "benign")), marker


def test_earlier_corpus_hostile_files_are_unsafe(earlier_corpus: tuple[list[str], list[str], str]) -> None:
    """Every hostile file of the bench corpus scans ``unsafe``."""
    hostile, _benign, marker = earlier_corpus
    assert len(hostile) >= 40
    verdicts = {os.path.basename(p): _findings(Path(p)) for p in hostile}
    wrong = [f"{name}: {verdict} ({why})" for name, (verdict, why) in verdicts.items() if verdict != "unsafe"]
    assert not os.path.exists(marker)
    assert not wrong, "\n".join(wrong)


def test_earlier_corpus_benign_files_are_safe(earlier_corpus: tuple[list[str], list[str], str]) -> None:
    """Every benign real layout of the bench corpus scans ``safe`` (a false alarm is a bug too)."""
    _hostile, benign, _marker = earlier_corpus
    assert len(benign) >= 10
    verdicts = {os.path.basename(p): _findings(Path(p)) for p in benign}
    wrong = [f"{name}: {verdict} ({why})" for name, (verdict, why) in verdicts.items() if verdict != "safe"]
    assert not wrong, "\n".join(wrong)
