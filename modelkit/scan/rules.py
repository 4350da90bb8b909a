"""Scan rules as registered units: a stable id, a severity, a title and a help text.

Registering a rule declares it; the SARIF ``rules[]`` array and the README's rule table are
generated from ``RULES``. The denylist below only *explains* findings and rates them: whether a
global is allowed is decided by the allow-list alone (``modelkit.formats.unpickler.ALLOWED``).
"""

from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("info", "low", "medium", "high", "critical")


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    verdict: str  # what a finding of this rule makes the file: safe | suspicious | unsafe | error
    title: str
    help: str


RULES: dict[str, Rule] = {}


def rule(id: str, severity: str, verdict: str, title: str, help: str) -> Rule:
    """Register a rule and return it."""
    if id in RULES:
        raise ValueError(f"duplicate rule id {id}")
    r = Rule(id, severity, verdict, title, help)
    RULES[id] = r
    return r


UNSAFE_GLOBAL = rule(
    "MK-P001", "high", "unsafe", "Global outside the allow-list",
    "The pickle imports a callable or type that model files never need. Loading it with torch.load "
    "or pickle runs that code. Do not load the file; if you trust its source, convert it with "
    "`modelkit convert --ignore-scan`, which still reads it without running anything.",
)
PLACEHOLDER_GLOBAL = rule(
    "MK-P002", "info", "safe", "Harmless non-tensor global",
    "A class seen in real checkpoints (for example a Lightning callback) that modelkit loads as an "
    "inert placeholder. torch.load with weights_only=True refuses such files; modelkit reads them.",
)
PICKLE_ERROR = rule(
    "MK-P003", "medium", "error", "Pickle cannot be parsed",
    "The pickle is malformed or truncated. A loader still runs every opcode before the error, so "
    "the file is not reported clean. Download it again or treat it as hostile.",
)
RESOURCE_LIMIT = rule(
    "MK-P004", "medium", "error", "Pickle exceeds a resource bound",
    "The pickle has more opcodes, memo entries, nesting or objects than any real model file; it "
    "is built to exhaust memory or time.",
)
EXTENSION_CODE = rule(
    "MK-P005", "high", "unsafe", "Extension-registry lookup",
    "EXT1/EXT2/EXT4 opcodes import a global through copyreg's extension registry, which a loading "
    "process may have filled; model files never use them.",
)
DYNAMIC_NAME = rule(
    "MK-P006", "high", "unsafe", "Computed global name",
    "STACK_GLOBAL takes a module or name that is not a constant string, a way to hide the import.",
)
TRAILING_PICKLE = rule(
    "MK-P007", "medium", "suspicious", "Data after the pickle",
    "Bytes follow the pickle's STOP opcode. Some loaders read concatenated pickles; every one found "
    "is scanned too.",
)
USER_ALLOWED = rule(
    "MK-P008", "info", "safe", "Global allowed by --allow",
    "A global outside the allow-list that the user audited and allowed for this scan with --allow. "
    "Every report lists the exceptions in force.",
)
NESTED = rule(
    "MK-P009", "info", "safe", "Nested pickle or zip scanned",
    "A byte constant inside the pickle is itself a pickle or a zip archive; it was scanned too, "
    "to a bounded depth.",
)
ZIP_ANOMALY = rule(
    "MK-Z001", "high", "unsafe", "Inconsistent zip archive",
    "Local and central names disagree, a name repeats, a member is encrypted or lies outside the "
    "archive's top folder. Loaders resolve these differently, which hides content from scanners.",
)
ZIP_ERROR = rule(
    "MK-Z002", "medium", "error", "Zip archive cannot be parsed",
    "The archive is truncated or corrupt; nothing in it is reported clean.",
)
POLYGLOT = rule(
    "MK-Z003", "high", "unsafe", "Pickle/zip polyglot",
    "The file is a pickle at byte 0 and a zip archive at its end. torch.load runs the pickle while "
    "zip-based tools see only the archive, a known way to get past scanners.",
)
WRAPPED = rule(
    "MK-W001", "low", "safe", "Compressed wrapper",
    "The file is a gzip, bzip2 or xz stream; its content was decompressed (bounded) and scanned.",
)
PICKLE_FORMAT = rule(
    "MK-F002", "medium", "unsafe", "Pickle-format model file",
    "With --require-safetensors, any model file that is not .safetensors is rejected: pickle "
    "formats can carry code. Convert it with `modelkit convert`.",
)
HEADER_ERROR = rule(
    "MK-S001", "medium", "error", "Invalid header",
    "The safetensors, GGUF or .npy header fails validation; the file cannot be trusted.",
)
OBJECT_ARRAY = rule(
    "MK-N001", "high", "unsafe", "Object array",
    "A numpy object array is a pickle; numpy.load runs it when pickles are allowed.",
)
NOT_MODEL = rule(
    "MK-F001", "low", "error", "Not a model file",
    "The content is not a container modelkit knows; it was not scanned.",
)
UNSAFE_CALL = rule(
    "MK-P010", "critical", "unsafe", "Unsafe call through allowed globals",
    "The pickle uses only allowed globals, but CPython or torch would make a call no opcode names: "
    "a BUILD plants __setstate__ (or another dunder) in an object's state, slot state is set with "
    "setattr, torch's state rebuilders or backward hooks get callables, a nested torch.load gets "
    "bytes built at run time, or a numpy dtype carries object flags. Do not load the file.",
)
FRAME_ANOMALY = rule(
    "MK-P011", "high", "unsafe", "Frames that readers decode differently",
    "An opcode straddles the end of a protocol-4 FRAME, a frame starts inside another, or the pickle "
    "stops before its frame ends. CPython decodes such bytes one way from memory and another from a "
    "file or io.BytesIO (as torch reads zip members), a way to show a scanner one stream and run "
    "another. No writer produces it; both readings are scanned.",
)
MAGIC_SPELLING = rule(
    "MK-P012", "medium", "suspicious", "Unusual legacy magic number",
    "The first pickle is not the int torch writes, but torch's `!=` check could still take it for "
    "the legacy magic number (a numpy scalar or an array compares after rounding), so torch.load "
    "would read on as a legacy stream. The stream was scanned both ways.",
)
INTERNAL = rule(
    "MK-X001", "medium", "error", "Scanner error",
    "The scanner failed on this file. This is a bug in modelkit; the file is not reported clean.",
)
SAFETENSORS_POLYGLOT = rule(
    "MK-S002", "high", "unsafe", "Safetensors/pickle polyglot",
    "The file has a valid safetensors header and is also a pickle from byte 0 that reaches a global "
    "or makes a call: the header's length bytes and JSON spell opcodes that run on into the tensor "
    "data. Safetensors readers see tensors; torch.load, which unpickles any file that is not a zip "
    "whatever its name, runs the pickle. The pickle was scanned too; do not load the file with torch.",
)
TAR_UNFOLLOWED = rule(
    "MK-A001", "high", "unsafe", "Tar checkpoint read the scanner cannot follow",
    "torch.load reads a pre-0.4 tar checkpoint in a fixed order: pickles between raw storage bytes "
    "in 'storages', then 'tensors', then 'pickle'. Here where torch reads next depends on what the "
    "scanner cannot know for sure (a member that is a link or sparse, a storage type whose element "
    "size is unknown, a count that is not a plain int), so the bytes torch would unpickle next were "
    "not scanned. Real checkpoints never do this.",
)

# -- the denylist: explanations and severities only ----------------------------------------------

DENY_EXPLAIN: dict[tuple[str, str], tuple[str, str]] = {
    ("os", "system"): ("critical", "runs a shell command"),
    ("posix", "system"): ("critical", "runs a shell command"),
    ("nt", "system"): ("critical", "runs a shell command"),
    ("os", "popen"): ("critical", "runs a shell command"),
    ("os", "execv"): ("critical", "replaces the process with another program"),
    ("os", "execvp"): ("critical", "replaces the process with another program"),
    ("subprocess", "Popen"): ("critical", "starts a program"),
    ("subprocess", "run"): ("critical", "starts a program"),
    ("subprocess", "call"): ("critical", "starts a program"),
    ("subprocess", "check_output"): ("critical", "starts a program"),
    ("subprocess", "check_call"): ("critical", "starts a program"),
    ("builtins", "eval"): ("critical", "evaluates Python code"),
    ("builtins", "exec"): ("critical", "executes Python code"),
    ("builtins", "compile"): ("critical", "compiles Python code"),
    ("builtins", "__import__"): ("critical", "imports any module"),
    ("builtins", "getattr"): ("critical", "reaches any attribute (a gadget for any call)"),
    ("builtins", "open"): ("high", "opens a file"),
    ("builtins", "breakpoint"): ("high", "starts a debugger"),
    ("importlib", "import_module"): ("critical", "imports any module"),
    ("runpy", "run_path"): ("critical", "runs a Python file"),
    ("runpy", "run_module"): ("critical", "runs a Python module"),
    ("webbrowser", "open"): ("high", "opens a URL"),
    ("socket", "create_connection"): ("critical", "opens a network connection"),
    ("shutil", "rmtree"): ("critical", "deletes a folder tree"),
    ("os", "remove"): ("critical", "deletes a file"),
    ("pickle", "loads"): ("critical", "unpickles nested data with no restrictions"),
    ("torch", "load"): ("critical", "loads a nested pickle with no restrictions"),
    ("numpy", "load"): ("high", "loads a file that may hold a pickle"),
    ("pty", "spawn"): ("critical", "starts a program with a terminal"),
    ("code", "interact"): ("critical", "starts an interactive interpreter"),
    ("ctypes", "CDLL"): ("critical", "loads a native library"),
}
DENY_MODULES: dict[str, tuple[str, str]] = {
    "os": ("critical", "operating-system access"),
    "posix": ("critical", "operating-system access"),
    "nt": ("critical", "operating-system access"),
    "subprocess": ("critical", "starts programs"),
    "builtins": ("high", "a Python builtin"),
    "__builtin__": ("high", "a Python builtin"),
    "socket": ("critical", "network access"),
    "shutil": ("critical", "file-system changes"),
    "sys": ("high", "interpreter internals"),
    "ctypes": ("critical", "native code"),
    "marshal": ("critical", "loads code objects"),
    "types": ("critical", "builds code and functions"),
    "asyncio": ("high", "process and network access"),
    "requests": ("high", "network access"),
    "urllib.request": ("high", "network access"),
    "http.client": ("high", "network access"),
}


def explain_global(module: str, name: str) -> tuple[str, str]:
    """(severity, what it does) for a refused global; ``high`` when we know nothing specific."""
    hit = DENY_EXPLAIN.get((module, name))
    if hit is None and module == "__builtin__":
        hit = DENY_EXPLAIN.get(("builtins", name))
    if hit:
        return hit
    top = DENY_MODULES.get(module) or DENY_MODULES.get(module.split(".")[0])
    if top:
        return top
    return "high", "not needed by any model file"


def markdown_table() -> str:
    """The README's rule table, generated from the registry."""
    lines = ["| id | severity | makes a file | title |", "|---|---|---|---|"]
    lines += [f"| `{r.id}` | {r.severity} | {r.verdict} | {r.title} |" for r in RULES.values()]
    return "\n".join(lines)



REMOTE_ERROR = rule(
    "MK-R001", "medium", "error", "Remote file not read consistently",
    "The remote file could not be read as one and the same sequence of bytes: an HTTP error that "
    "retries did not cure, a server that gives two lengths, cuts a response short, sends other "
    "bytes than asked for, or a file that changed between requests (ETag/Last-Modified). A scan of "
    "such a file proves nothing about what a download would hold, so it is not reported clean.",
)
TORCHSCRIPT = rule(
    "MK-T001", "medium", "suspicious", "TorchScript archive",
    "A TorchScript program (torch.jit.save output), not a state dict. torch.load hands it to "
    "torch.jit.load, which compiles its code; running the model runs that code. modelkit reads "
    "weights only and refuses it; load it with torch.jit.load only if you trust its source.",
)
TORCHSCRIPT_CODE = rule(
    "MK-T002", "high", "unsafe", "TorchScript code that runs on load",
    "The TorchScript program defines __setstate__, which torch.jit.load (and torch.load, which "
    "hands TorchScript archives to it) runs while loading the file, before any model is used.",
)
