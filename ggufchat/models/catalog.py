"""Model names users type: catalog aliases with quant tags, hub URLs, and plain paths.

    qwen2-7b-instruct:q5_k_m            an alias from the catalog, with a quant tag
    hf://Qwen/Qwen2-7B-Instruct-GGUF:q5_k_m   a Hugging Face repo and a quant tag
    ms://qwen/Qwen2-7B-Instruct-GGUF/qwen2-7b-instruct-q5_k_m.gguf   a ModelScope repo and a file
    https://example.org/model.gguf      a direct link (#sha256=HEX checks it)
    https://huggingface.co/OWNER/REPO/resolve/REV/FILE          the same as hf://OWNER/REPO/FILE at REV
    https://www.modelscope.cn/models/OWNER/REPO/resolve/REV/FILE   the same as ms://OWNER/REPO/FILE at REV
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ggufchat.errors import InvalidParameter


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    hf_repo: str
    ms_repo: str | None
    default_quant: str | None
    about: str


CATALOG: dict[str, CatalogEntry] = {e.alias: e for e in [
    CatalogEntry("qwen2-7b-instruct", "Qwen/Qwen2-7B-Instruct-GGUF", "qwen/Qwen2-7B-Instruct-GGUF",
                 "q4_k_m", "Qwen2 7B Instruct (ChatML), the model of the llama.cpp tutorial"),
    CatalogEntry("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                 "q4_k_m", "Qwen2.5 0.5B Instruct: small enough for any laptop"),
    CatalogEntry("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct-GGUF", "Qwen/Qwen2.5-7B-Instruct-GGUF",
                 "q4_k_m", "Qwen2.5 7B Instruct (split GGUF files)"),
    CatalogEntry("llama-3-8b-instruct", "QuantFactory/Meta-Llama-3-8B-Instruct-GGUF",
                 "LLM-Research/Meta-Llama-3-8B-Instruct-GGUF", "q4_k_m", "Meta Llama 3 8B Instruct"),
    CatalogEntry("smollm2-135m-instruct", "bartowski/SmolLM2-135M-Instruct-GGUF", None, "q4_k_m",
                 "SmolLM2 135M Instruct (the embedded default ships as Q4_1)"),
]}

SOURCES = ("hf", "ms")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelRef:
    """What a model spec names, before anything is looked up."""

    kind: str  # "catalog", "hf", "ms" or "url"
    repo: str | None = None  # catalog alias, or owner/name
    quant: str | None = None
    filename: str | None = None
    url: str | None = None  # without its #fragment
    revision: str | None = None  # from a hub file URL
    sha256: str | None = None  # from a URL's #sha256=HEX

    @property
    def display(self) -> str:
        if self.kind == "url":
            # The cache name: no query string, which may carry a signature or a token.
            return (self.url or "").split("?")[0]
        prefix = "" if self.kind == "catalog" else f"{self.kind}://"
        tail = f"/{self.filename}" if self.filename else (f":{self.quant}" if self.quant else "")
        return f"{prefix}{self.repo}{tail}"


def looks_like_remote(spec: str) -> bool:
    return spec.startswith(("hf://", "ms://", "https://", "http://")) or spec.split(":")[0].lower() in CATALOG


def parse_spec(spec: str) -> ModelRef:
    """Parse a model spec; raise InvalidParameter with the accepted forms when it fits none."""
    text = spec.strip()
    if text.startswith(("https://", "http://")):
        return _parse_url(spec, text)
    for scheme in SOURCES:
        if text.startswith(f"{scheme}://"):
            rest = text[len(scheme) + 3:]
            parts = rest.split("/")
            if len(parts) < 2 or not parts[0] or not parts[1]:
                raise InvalidParameter(f"{spec}: expected {scheme}://OWNER/REPO[:QUANT|/FILE]", param="model")
            owner, name = parts[0], parts[1]
            quant = None
            if ":" in name:
                name, quant = name.split(":", 1)
            filename = "/".join(parts[2:]) or None
            if filename and quant:
                raise InvalidParameter(f"{spec}: give a quant tag or a file, not both", param="model")
            return ModelRef(scheme, repo=f"{owner}/{name}", quant=quant.lower() if quant else None,
                            filename=filename)
    alias, _, quant = text.partition(":")
    if alias.lower() in CATALOG:
        entry = CATALOG[alias.lower()]
        return ModelRef("catalog", repo=entry.alias, quant=(quant or entry.default_quant or "").lower() or None)
    raise InvalidParameter(
        f"unknown model {spec!r}",
        hint="Use an alias (" + ", ".join(CATALOG) + "), hf://OWNER/REPO[:QUANT|/FILE], "
             "ms://OWNER/REPO[:QUANT|/FILE], an https URL of a .gguf, or a path to a .gguf file.",
        param="model",
    )


HF_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
MS_HOSTS = ("modelscope.cn", "www.modelscope.cn")
# /OWNER/REPO/resolve/REV/FILE is the download link; /blob/ is the file's page on the Hub.
_HF_FILE_URL = re.compile(r"^/(?P<owner>[^/]+)/(?P<repo>[^/]+)/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<file>.+)$")
# /models/OWNER/REPO/resolve/REV/FILE downloads; /models/OWNER/REPO/file/view/REV/FILE is the file's page.
_MS_FILE_URL = re.compile(
    r"^/models/(?P<owner>[^/]+)/(?P<repo>[^/]+)/(?:resolve|file/view)/(?P<rev>[^/]+)/(?P<file>.+)$")
_MS_API_URL = re.compile(r"^/api/v1/models/(?P<owner>[^/]+)/(?P<repo>[^/]+)/repo$")


def _parse_url(spec: str, text: str) -> ModelRef:
    """A Hugging Face or ModelScope file URL becomes that hub's ref (hub client, hub sha256); any other .gguf URL
    is a direct download."""
    url, _, fragment = text.partition("#")
    sha256 = None
    if fragment:
        m = re.fullmatch(r"sha256[=:]([0-9a-fA-F]{64})", fragment)
        if not m:
            raise InvalidParameter(f"{spec}: the only URL fragment understood is #sha256= and 64 hex digits",
                                   param="model")
        sha256 = m[1].lower()
    parts = urlsplit(url)
    host, path = (parts.hostname or "").lower(), unquote(parts.path)
    hub = None
    if host in HF_HOSTS and (m := _HF_FILE_URL.match(path)):
        hub, owner, repo, rev, filename = "hf", m["owner"], m["repo"], m["rev"], m["file"]
    elif host in MS_HOSTS and (m := _MS_FILE_URL.match(path)):
        hub, owner, repo, rev, filename = "ms", m["owner"], m["repo"], m["rev"], m["file"]
    elif host in MS_HOSTS and (m := _MS_API_URL.match(path)):
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if not query.get("FilePath"):
            raise InvalidParameter(f"{spec}: a ModelScope file URL needs FilePath=FILE", param="model")
        hub, owner, repo, rev, filename = "ms", m["owner"], m["repo"], query.get("Revision"), query["FilePath"]
    else:
        filename = path.rsplit("/", 1)[-1]
    if not filename.lower().endswith(".gguf"):
        raise InvalidParameter(f"{spec} does not point at a .gguf file", param="model")
    if hub:
        return ModelRef(hub, repo=f"{owner}/{repo}", filename=filename, revision=rev, sha256=sha256)
    return ModelRef("url", url=url, filename=filename, sha256=sha256)


def split_info(filename: str) -> tuple[str, int, int] | None:
    """('prefix', part, of) for split GGUF names like x-00001-of-00003.gguf, else None."""
    m = _SPLIT_RE.search(filename)
    if not m:
        return None
    return filename[: m.start()], int(m.group(1)), int(m.group(2))


def split_names(filename: str) -> list[str]:
    """Every part's file name of the split model `filename` belongs to, in order; [filename] if it is
    not split. llama.cpp's gguf-split naming: PREFIX-00001-of-00003.gguf."""
    split = split_info(filename)
    if split is None:
        return [filename]
    prefix, _, count = split
    return [f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def pick_files(listing: list[str], quant: str | None, where: str) -> list[str]:
    """The GGUF file(s) of one model in a repo listing: one file, or every part of a split model.

    The quant tag matches case-insensitively as a whole word of the file name.
    """
    ggufs = sorted(f for f in listing if f.lower().endswith(".gguf"))
    if not ggufs:
        raise InvalidParameter(f"{where} holds no .gguf files")
    models = _group(ggufs)
    if quant:
        # "q4_k" must not pick "q4_k_m": the tag ends where no letter, digit or "_" follows.
        pattern = re.compile(rf"(?<![a-z0-9]){re.escape(quant.lower())}(?![a-z0-9_])")
        models = {k: v for k, v in models.items() if pattern.search(k.lower())}
    if len(models) == 1:
        return next(iter(models.values()))
    offered = ", ".join(sorted({quant_of(k) or k for k in _group(ggufs)}))
    if not models:
        raise InvalidParameter(f"{where} has no file for quant {quant!r}; it offers: {offered}", param="quant")
    raise InvalidParameter(
        f"{where} has several files for {quant or 'this model'}: {', '.join(sorted(models))}; "
        f"name a quant tag ({offered}) or a file",
        param="quant",
    )


def _group(ggufs: list[str]) -> dict[str, list[str]]:
    """Model key (file name, or split prefix) -> files, parts in order."""
    groups: dict[str, list[str]] = {}
    for f in ggufs:
        info = split_info(f)
        key = info[0] + ".gguf" if info else f
        groups.setdefault(key, []).append(f)
    return groups


_QUANT_RE = re.compile(r"(?i)(?<![a-z0-9])((?:i?q\d(?:_[a-z0-9]+)*)|fp16|f16|bf16|fp32|f32)(?![a-z0-9])")


def quant_of(filename: str) -> str | None:
    """The quant tag in a GGUF file name (q5_k_m, iq4_xs, f16, ...), lower case."""
    name = filename.rsplit("/", 1)[-1]
    info = split_info(name)
    if info:
        name = info[0]
    found = _QUANT_RE.findall(name)
    return found[-1].lower() if found else None
