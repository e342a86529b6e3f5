"""Static check of dvc.yaml against what each stage's code can import, read and write (ast only).

Nothing of the project is imported: every fact comes from parsing ``src/`` with :mod:`ast`, so imports made
inside functions, methods, ``try`` blocks and ``if`` branches are seen even though they never run on import.

For each stage (its module comes from ``cmd: python -m <module>``) the checker derives three needs:

code    every project source file the stage can execute: the stage module, the ``__init__.py`` of every
        package above it, and, transitively, every project module any of them imports anywhere in its body.
paths   the path constants of ``cifar10_pipeline.core.paths`` the *stage module* references (library
        modules take paths as arguments) and the ``Path("data|models|metrics|reports/...")`` literals in it,
        each folded with literal ``/ "name"`` suffixes where the code joins them.
params  the params sections/keys the stage reads from ``load_params()``: attribute access on the Params object
        and on its sections, followed into every project function the object (or a section) is passed to.

and compares them with the stage's ``deps``, ``params`` and ``outs``/``metrics``/``plots``.

Limits (what the scan does not see):
- dynamic imports (``importlib.import_module(name)``, ``__import__``) are not followed; the project has none.
- name binding is per module, not per scope: a local variable that shadows an imported module is not told
  apart from it.
- paths: only the stage module is scanned; a path built from a variable (``Path(stage_dir) / f"{x}.json"``)
  counts as its base constant, and a bare directory constant is satisfied by any declared path inside it
  (the emissions stage reads two files of ``metrics/emissions``; dropping one of them is not noticed).
  Declared data deps the stage never references are not reported: some are deliberate ordering deps
  (preprocess depends on ``metrics/validation.json`` so that it runs only after validation passed).
- params: the deep scan follows the Params object and its sections through calls to functions defined in the
  project (the stage module or library modules, by name, position or keyword), including callbacks handed
  over as the first argument (``executor.submit(fn, params)``). Any other use (an unknown callee, ``getattr``,
  a subscript, an f-string, a return) counts as reading the whole section (or, for the Params object, every
  section). Reads made by excluded modules (tracking.py) do not count, like their code.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

PACKAGE = "cifar10_pipeline"
PATHS_MODULE = f"{PACKAGE}.core.paths"
PARAMS_MODULE = f"{PACKAGE}.core.params"
LOAD_PARAMS = (f"{PARAMS_MODULE}.load_params", f"{PARAMS_MODULE}.validate_params")
# Top-level folders of pipeline data; a Path literal elsewhere (/proc/cpuinfo, mlflow.db) is not a DVC path.
# PARAMS_FILE (params.yaml) is not checked as a path either: its keys are checked against `params:` instead.
DATA_ROOTS = frozenset({"data", "models", "metrics", "records", "reports"})  # records/: read, never written

# Project files a stage may execute without declaring them, each with the reason.
NOT_A_RESULT_DEP: dict[str, str] = {
    f"src/{PACKAGE}/tracking/runs.py": (
        "the stage harness: mirrors results into MLflow and, when a stage fails, deletes its outputs; "
        "neither changes a successful result, so changing it must not retrain the model"
    ),
    f"src/{PACKAGE}/stages/__init__.py": "empty package marker of the stage modules",
}
# Pipeline paths a stage may use without declaring them, each with the reason.
NOT_A_DECLARED_PATH: dict[str, str] = {
    "models/checkpoints/train": (
        "the train stage's resumable checkpoint: scratch state that must survive a crashed run (DVC deletes "
        "declared outputs before it re-runs a stage), used only when its fingerprint matches the run's own "
        "params, data and code, and deleted once the model is saved"
    ),
}
# Modules whose own imports and params reads are not followed: what only tracking.py pulls in serves
# logging, not results (today it imports params.py and paths.py, which every stage declares anyway).
NOT_FOLLOWED = frozenset({f"{PACKAGE}.tracking.runs"})

CODE_MISSING = "missing code dep"
CODE_STALE = "stale code dep"
PATH_MISSING = "undeclared path"
PARAM_MISSING = "missing param"
PARAM_STALE = "stale param"


@dataclass(frozen=True, order=True)
class Problem:
    stage: str
    kind: str
    item: str
    why: str = field(compare=False)

    @property
    def key(self) -> str:
        """``kind item``: what a known-problem list pins (the evidence may move with the code)."""
        return f"{self.kind} {self.item}"

    def __str__(self) -> str:
        return f"{self.stage}: {self.key} ({self.why})"


@dataclass(frozen=True)
class PathRef:
    path: PurePosixPath
    folded: bool  # built with a literal `/ "name"` suffix at the use site: must be covered exactly
    where: str


@dataclass
class StageNeeds:
    module: str
    code: dict[str, str]  # project file -> how the stage reaches it (import chain)
    paths: list[PathRef]
    params: dict[str, str]  # "section", "section.key" or a top-level key -> where it is read


@dataclass(frozen=True)
class ParamsSchema:
    """What params.py defines: the sections of Params, their fields and properties."""

    attr_to_section: dict[str, str]  # Params attribute -> params.yaml key (validation -> validate)
    top_level: frozenset[str]  # Params attributes that are plain values (profile)
    class_to_section: dict[str, str]  # TrainParams -> train
    fields: dict[str, frozenset[str]]  # section -> its keys
    properties: dict[str, dict[str, frozenset[str]]]  # section -> property -> keys it reads


# Kinds of values the params scan follows: the whole Params object, or one section of it.
PARAMS_OBJECT = "<Params>"


def _short(node: ast.AST, limit: int = 70) -> str:
    text = ast.unparse(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind_section(kind: str) -> str | None:
    return None if kind == PARAMS_OBJECT else kind


def _bindings(node: ast.AST | None) -> list[tuple[str, ast.expr]]:
    """(name, value) pairs an assignment binds: ``x = v``, ``x: T = v``, ``a, b = v, w`` (element-wise)."""
    if isinstance(node, ast.Assign):
        targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets, value = [node.target], node.value
    else:
        return []
    pairs: list[tuple[str, ast.expr]] = []
    for target in targets:
        if isinstance(target, ast.Name):
            pairs.append((target.id, value))
        elif (
            isinstance(target, ast.Tuple | ast.List)
            and isinstance(value, ast.Tuple | ast.List)
            and len(target.elts) == len(value.elts)
            and not any(isinstance(e, ast.Starred) for e in (*target.elts, *value.elts))
        ):
            pairs += [
                (t.id, v) for t, v in zip(target.elts, value.elts, strict=True) if isinstance(t, ast.Name)
            ]
    return pairs


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:`` blocks (their ``else`` stays).

    TYPE_CHECKING-only imports do not count as code deps: they never execute, so they cannot change a result
    (train.py's ``from cifar10_pipeline.tracking.runs import StageRun`` is one).
    """
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from runtime_nodes(other)
            continue
        yield child
        yield from runtime_nodes(child)


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class ProjectIndex:
    """Parsed project sources under ``root/src`` (one parse per file)."""

    def __init__(self, root: Path, package: str = PACKAGE) -> None:
        self.root = root
        self.src = root / "src"
        self.package = package
        self._files: dict[str, Path | None] = {}
        self._trees: dict[str, ast.Module] = {}
        self._imports: dict[str, tuple[tuple[str, int], ...]] = {}
        self._bindings: dict[str, dict[str, str]] = {}
        self._needs: dict[str, StageNeeds] = {}

    # -- modules -----------------------------------------------------------------------------------------
    def module_file(self, module: str) -> Path | None:
        if module not in self._files:
            self._files[module] = None
            if module == self.package or module.startswith(self.package + "."):
                base = self.src.joinpath(*module.split("."))
                for candidate in (base / "__init__.py", base.with_suffix(".py")):
                    if candidate.is_file():
                        self._files[module] = candidate
        return self._files[module]

    def is_module(self, module: str) -> bool:
        return self.module_file(module) is not None

    def relpath(self, module: str) -> str:
        path = self.module_file(module)
        assert path is not None, module
        return path.relative_to(self.root).as_posix()

    def is_package_marker(self, file: str) -> bool:
        """A layer's ``__init__.py`` holding only its docstring: running it cannot change a result."""
        path = self.root / file
        if path.name != "__init__.py" or path.parent == self.src / PACKAGE:
            return False
        body = ast.parse(path.read_text(encoding="utf-8")).body
        return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            path = self.module_file(module)
            assert path is not None, f"{module} is not a project module"
            self._trees[module] = ast.parse(path.read_text(), filename=str(path))
        return self._trees[module]

    def _package_of(self, module: str) -> str:
        path = self.module_file(module)
        return module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self._package_of(module).split(".")
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)

    def imports(self, module: str) -> tuple[tuple[str, int], ...]:
        """(project module, line) for every import ``module`` can execute, at any depth of its body."""
        if module in self._imports:
            return self._imports[module]
        found: list[tuple[str, int]] = []
        for node in runtime_nodes(self.tree(module)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets += _prefixes(alias.name)  # `import a.b.c` runs a, a.b and a.b.c
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(module, node)
                targets += _prefixes(base)
                # `from pkg import name`: name may be a submodule, imported by this statement.
                targets += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
            found += [(target, node.lineno) for target in targets if self.is_module(target)]
        self._imports[module] = tuple(found)
        return self._imports[module]

    def executed_files(self, module: str) -> dict[str, str]:
        """Project files running ``python -m module`` can execute -> the import chain that reaches each."""
        chains: dict[str, list[str]] = {}
        queue: list[tuple[str, list[str]]] = []
        # runpy imports every package above the module first; each of them is a start too.
        for start in _prefixes(module):
            if self.is_module(start) and start not in chains:
                chains[start] = [start if start == module else f"{start} (package of {module})"]
                queue.append((start, chains[start]))
        while queue:
            current, chain = queue.pop(0)
            if current in NOT_FOLLOWED:
                continue
            for target, line in self.imports(current):
                if target not in chains:
                    chains[target] = [*chain[:-1], f"{chain[-1]}:{line}", target]
                    queue.append((target, chains[target]))
        return {self.relpath(name): " -> ".join(chain) for name, chain in chains.items()}

    # -- names -------------------------------------------------------------------------------------------
    def bindings(self, module: str) -> dict[str, str]:
        """Name -> dotted target for every import in ``module`` (any scope), and its module-level defs."""
        if module in self._bindings:
            return self._bindings[module]
        names: dict[str, str] = self._bindings.setdefault(module, {})
        tree = self.tree(module)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names[node.name] = f"{module}.{node.name}"
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        names[target.id] = f"{module}.{target.id}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        names[alias.asname] = alias.name
                    else:
                        top = alias.name.split(".")[0]
                        names[top] = top
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(module, node)
                for alias in node.names:
                    if alias.name != "*":
                        names[alias.asname or alias.name] = f"{base}.{alias.name}"
        return names

    def qualname(self, module: str, expr: ast.expr) -> str | None:
        """The dotted name ``expr`` stands for in ``module`` (``paths.X`` is
        ``cifar10_pipeline.core.paths.X``)."""
        if isinstance(expr, ast.Name):
            return self.bindings(module).get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = self.qualname(module, expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    def split_qualname(self, qualname: str) -> tuple[str, str] | None:
        """(project module, name in it) for a dotted name, following re-exports; None outside the project."""
        seen: set[str] = set()
        while qualname not in seen:
            seen.add(qualname)
            module, _, name = qualname.rpartition(".")
            if not module or not self.is_module(module):
                return None
            target = self.bindings(module).get(name)
            if target is None or target == f"{module}.{name}":
                return module, name
            qualname = target  # `from x import f` in module: f lives in x
        return None

    def function(self, module: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        for node in self.tree(module).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
                return node
        return None

    # -- paths -------------------------------------------------------------------------------------------
    @functools.cached_property
    def path_constants(self) -> dict[str, PurePosixPath]:
        """The constants of paths.py, evaluated from their ``Path("...")`` / ``X / "name"`` definitions."""
        constants: dict[str, PurePosixPath] = {}
        for node in self.tree(PATHS_MODULE).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                value = self._eval_path(PATHS_MODULE, node.value, constants)
                if isinstance(target, ast.Name) and value is not None:
                    constants[target.id] = value
        return constants

    def _eval_path(
        self, module: str, expr: ast.expr, local: Mapping[str, PurePosixPath]
    ) -> PurePosixPath | None:
        if isinstance(expr, ast.Name) and expr.id in local:
            return local[expr.id]
        if isinstance(expr, ast.Call) and len(expr.args) == 1 and not expr.keywords:
            func = expr.func
            if (isinstance(func, ast.Name) and func.id in ("Path", "PurePosixPath")) or (
                self.qualname(module, func) in ("pathlib.Path", "pathlib.PurePosixPath")
            ):
                arg = expr.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    return PurePosixPath(arg.value)
                return self._eval_path(module, arg, local)
            return None
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Div):
            left = self._eval_path(module, expr.left, local)
            right = expr.right
            if left is not None and isinstance(right, ast.Constant) and isinstance(right.value, str):
                return left / right.value
            return None
        if isinstance(expr, ast.Name | ast.Attribute) and module != PATHS_MODULE:
            qualname = self.qualname(module, expr)
            prefix = PATHS_MODULE + "."
            if qualname and qualname.startswith(prefix):
                return self.path_constants.get(qualname.removeprefix(prefix))
        return None

    def path_refs(self, module: str) -> list[PathRef]:
        """Paths the module references: paths.py constants, its own Path literals, folded `/ "name"` joins."""
        tree = self.tree(module)
        local: dict[str, PurePosixPath] = {}
        for node in tree.body:  # module-level constants, in order (one may build on another)
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                value = self._eval_path(module, node.value, local)
                if value is not None:
                    local[node.targets[0].id] = value
        rel = self.relpath(module)
        refs: list[PathRef] = []

        def visit(node: ast.AST) -> None:
            if isinstance(node, ast.ImportFrom) and self._absolute(module, node) == PATHS_MODULE:
                for alias in node.names:
                    if alias.name in self.path_constants:
                        where = f"{rel}:{node.lineno} imports {alias.name}"
                        refs.append(PathRef(self.path_constants[alias.name], False, where))
                return
            if isinstance(node, ast.expr) and not isinstance(getattr(node, "ctx", None), ast.Store):
                value = self._eval_path(module, node, local)
                if value is not None:
                    folded = isinstance(node, ast.BinOp)
                    refs.append(PathRef(value, folded, f"{rel}:{node.lineno} `{_short(node)}`"))
                    return
            for child in ast.iter_child_nodes(node):
                visit(child)

        visit(tree)
        return [ref for ref in refs if ref.path.parts and ref.path.parts[0] in DATA_ROOTS]

    # -- params ------------------------------------------------------------------------------------------
    @functools.cached_property
    def params_schema(self) -> ParamsSchema:
        classes = {
            node.name: node for node in self.tree(PARAMS_MODULE).body if isinstance(node, ast.ClassDef)
        }
        params_class = classes["Params"]
        attr_to_section: dict[str, str] = {}
        class_to_section: dict[str, str] = {}
        top_level: set[str] = set()
        for node in params_class.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            attr = node.target.id
            annotation = node.annotation
            if isinstance(annotation, ast.Name) and annotation.id in classes:
                alias = attr
                if isinstance(node.value, ast.Call):
                    for keyword in node.value.keywords:
                        if keyword.arg == "alias" and isinstance(keyword.value, ast.Constant):
                            alias = str(keyword.value.value)
                attr_to_section[attr] = alias
                class_to_section[annotation.id] = alias
            else:
                top_level.add(attr)
        fields: dict[str, frozenset[str]] = {}
        properties: dict[str, dict[str, frozenset[str]]] = {}
        for class_name, section in class_to_section.items():
            body = classes[class_name].body
            keys = frozenset(
                n.target.id for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
            )
            fields[section] = keys
            properties[section] = {
                n.name: frozenset(
                    a.attr
                    for a in ast.walk(n)
                    if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id == "self"
                )
                & keys
                for n in body
                if isinstance(n, ast.FunctionDef)
                and any(isinstance(d, ast.Name) and d.id == "property" for d in n.decorator_list)
            }
        return ParamsSchema(attr_to_section, frozenset(top_level), class_to_section, fields, properties)

    def params_reads(self, module: str) -> dict[str, str]:
        """Params sections/keys the stage module reads (see the module docstring for how far it looks)."""
        reads: dict[str, str] = {}
        scan = _ParamsScan(self, reads)
        # One scope per module-level function (its nested functions are closures and share its names), per
        # method, and the module's own statements; each starts from the load_params() calls in it.
        for node in self.tree(module).body:
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    scan.scan_body(module, item, {})
            else:
                scan.scan_body(module, node, {})
        return reads

    def needs(self, module: str) -> StageNeeds:
        """What running ``python -m module`` executes, references and reads (computed once per module)."""
        if module not in self._needs:
            code = self.executed_files(module)
            code.update(self.templates_rendered(code))
            self._needs[module] = StageNeeds(module, code, self.path_refs(module), self.params_reads(module))
        return self._needs[module]

    def templates_rendered(self, code: dict[str, str]) -> dict[str, str]:
        """Jinja templates of the package's template folders named by a string literal (``"x.md.j2"``, as
        given to ``get_template``) in an executed file: the text they render is a result dep like code."""
        found: dict[str, str] = {}
        folders = sorted(self.src.glob(f"{PACKAGE}/**/templates"))
        for file in sorted(code):
            tree = ast.parse((self.root / file).read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and node.value.endswith(".j2")
                ):
                    for folder in folders:
                        template = folder / node.value
                        if template.is_file():
                            rel = template.relative_to(self.root).as_posix()
                            found.setdefault(rel, f"rendered by {file}:{node.lineno}")
        return found


class _ParamsScan:
    """Follows ``load_params()`` results (and sections of them) through a module's functions."""

    def __init__(self, index: ProjectIndex, reads: dict[str, str]) -> None:
        self.index = index
        self.schema = index.params_schema
        self.reads = reads
        self.done: set[tuple[str, str, str, str]] = set()

    def read(self, item: str, where: str) -> None:
        self.reads.setdefault(item, f"read at {where}")

    def read_all(self, where: str) -> None:
        for item in (*self.schema.attr_to_section.values(), *self.schema.top_level):
            self.read(item, where)

    def scan_body(self, module: str, scope: ast.AST, seeds: dict[str, str]) -> None:
        """Scan one function (or the module body) given the kinds of its parameters (``seeds``)."""
        rel = self.index.relpath(module)
        own = [scope, *self._own_nodes(scope)]
        env = dict(seeds)
        changed = True
        while changed:  # local names bound to the Params object or a section (flow-insensitive)
            changed = False
            for node in own:
                for target, value in _bindings(node):
                    kind = self.kind_of(module, value, env)
                    if kind and env.get(target) != kind:
                        env[target] = kind
                        changed = True
        parents = {child: node for node in own for child in ast.iter_child_nodes(node)}
        for node in own:
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in env:
                self.use(module, rel, node, env[node.id], parents)
            elif isinstance(node, ast.Call) and self.index.qualname(module, node.func) in LOAD_PARAMS:
                self.use(module, rel, node, PARAMS_OBJECT, parents)

    @staticmethod
    def _own_nodes(scope: ast.AST) -> Iterator[ast.AST]:
        """Every node below ``scope``, nested functions included (closures see the same names)."""
        for child in ast.iter_child_nodes(scope):
            yield child
            yield from _ParamsScan._own_nodes(child)

    def kind_of(self, module: str, expr: ast.expr, env: Mapping[str, str]) -> str | None:
        if isinstance(expr, ast.Name):
            return env.get(expr.id)
        if isinstance(expr, ast.Call) and self.index.qualname(module, expr.func) in LOAD_PARAMS:
            return PARAMS_OBJECT
        if isinstance(expr, ast.Attribute) and self.kind_of(module, expr.value, env) == PARAMS_OBJECT:
            return self.schema.attr_to_section.get(expr.attr)
        return None

    def use(
        self, module: str, rel: str, node: ast.expr, kind: str, parents: Mapping[ast.AST, ast.AST]
    ) -> None:
        """Record what the use of ``node`` (a Params object or a section) reads."""
        where = f"{rel}:{node.lineno}"
        section = _kind_section(kind)
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.value is node:
            attr = parent.attr
            if section is None:
                if attr in self.schema.attr_to_section:
                    self.use(module, rel, parent, self.schema.attr_to_section[attr], parents)
                elif attr in self.schema.top_level:
                    self.read(attr, f"{where} `{_short(parent)}`")
                else:  # a method of Params (model_dump, as_flat_dict...): all of it
                    self.read_all(f"{where} `{_short(parent)}`")
            elif attr in self.schema.fields[section]:
                self.read(f"{section}.{attr}", f"{where} `{_short(parent)}`")
            elif attr in self.schema.properties[section]:
                for key in self.schema.properties[section][attr]:
                    self.read(f"{section}.{key}", f"{where} `{_short(parent)}` (property)")
            else:
                self.read(section, f"{where} `{_short(parent)}`")
            return
        statement = parents.get(parent) if isinstance(parent, ast.Tuple | ast.List) else parent
        if any(value is node for _, value in _bindings(statement)):
            return  # a local binding (`hp = params.train`, `a, b = x, y`): its uses are scanned
        if isinstance(parent, ast.Call) and node in parent.args:
            if self.pass_to(module, parent, parent.args.index(node), None, kind):
                return
        elif isinstance(parent, ast.keyword) and parent.arg:
            call = parents.get(parent)
            if isinstance(call, ast.Call) and self.pass_to(module, call, None, parent.arg, kind):
                return
        # Any other use: the value escapes where the scan cannot follow it, so all of it counts as read.
        context = parent if isinstance(parent, ast.expr) else node
        text = f"{where} `{_short(context)}`"
        if section is None:
            self.read_all(text)
        else:
            self.read(section, text)

    def pass_to(
        self, module: str, call: ast.Call, position: int | None, keyword: str | None, kind: str
    ) -> bool:
        """Follow a Params object/section passed to a project function; False when the callee is unknown."""
        target = self.callee(module, call.func)
        if target is not None and target[0] in NOT_FOLLOWED:
            return True  # tracking.stage_run(..., params): logging, not a result dep
        function = self.index.function(*target) if target is not None else None
        if function is None and position and keyword is None:
            # A callback and its arguments (executor.submit(fn, params), functools.partial): fn(params, ...).
            target = self.callee(module, call.args[0])
            function = self.index.function(*target) if target is not None else None
            position -= 1
            if target is not None and target[0] in NOT_FOLLOWED:
                return True
            start = 1
        else:
            start = 0
        if function is None or target is None:
            return False
        if position is not None and any(
            isinstance(a, ast.Starred) for a in call.args[start : start + position]
        ):
            return False
        args = function.args
        if keyword is not None:
            if keyword not in [a.arg for a in (*args.args, *args.kwonlyargs)]:
                return False
            parameter = keyword
        else:
            positional = [*args.posonlyargs, *args.args]
            if position is None or position >= len(positional):
                return False
            parameter = positional[position].arg
        key = (target[0], target[1], parameter, kind)
        if key not in self.done:
            self.done.add(key)
            self.scan_body(target[0], function, {parameter: kind})
        return True

    def callee(self, module: str, func: ast.expr) -> tuple[str, str] | None:
        qualname = self.index.qualname(module, func)
        return self.index.split_qualname(qualname) if qualname else None


# -- dvc.yaml --------------------------------------------------------------------------------------------
def entry_paths(entries: Sequence[Any] | None) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (entries are strings or ``{path: {options}}`` dicts)."""
    paths: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            paths.append(entry)
        elif isinstance(entry, Mapping):
            paths += [str(key) for key in entry]
    return paths


def params_entries(entries: Sequence[Any] | None) -> list[str]:
    """Keys of a stage's ``params:`` list in params.yaml (strings, or ``{params.yaml: [keys]}`` dicts)."""
    keys: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, Mapping):
            keys += [str(key) for key in entry.get("params.yaml") or []]
    return keys


def stage_module(stage: Mapping[str, Any]) -> str:
    words = str(stage["cmd"]).split()
    assert "-m" in words, f"stage cmd {stage['cmd']!r} is not `python -m <module>`"
    return words[words.index("-m") + 1]


def path_under(path: PurePosixPath, folder: PurePosixPath) -> bool:
    return path == folder or folder in path.parents


def param_under(item: str, entry: str) -> bool:
    return item == entry or item.startswith(entry + ".")


def check_stage(name: str, stage: Mapping[str, Any], index: ProjectIndex) -> list[Problem]:
    """Every omission (and stale code dep or param) of one dvc.yaml stage, sorted."""
    needs = index.needs(stage_module(stage))
    problems: list[Problem] = []
    deps = entry_paths(stage.get("deps"))
    src_prefix = PurePosixPath(index.src.relative_to(index.root).as_posix())

    # Code.
    code_deps = [PurePosixPath(dep) for dep in deps if path_under(PurePosixPath(dep), src_prefix)]
    for file, chain in sorted(needs.code.items()):
        if (
            file not in NOT_A_RESULT_DEP
            and not index.is_package_marker(file)
            and not any(path_under(PurePosixPath(file), dep) for dep in code_deps)
        ):
            problems.append(Problem(name, CODE_MISSING, file, f"executed via {chain}"))
    executed = [PurePosixPath(file) for file in needs.code]
    for dep in code_deps:
        if not any(path_under(file, dep) for file in executed):
            problems.append(Problem(name, CODE_STALE, dep.as_posix(), f"{needs.module} never imports it"))

    # Paths.
    declared = [
        PurePosixPath(p)
        for p in deps
        + entry_paths(stage.get("outs"))
        + entry_paths(stage.get("metrics"))
        + entry_paths(stage.get("plots"))
    ]
    undeclared: dict[PurePosixPath, list[str]] = {}
    for ref in needs.paths:
        covered = any(path_under(ref.path, d) for d in declared) or (
            not ref.folded and any(path_under(d, ref.path) for d in declared)
        )
        if not covered and ref.path.as_posix() not in NOT_A_DECLARED_PATH:
            undeclared.setdefault(ref.path, []).append(ref.where)
    for path, wheres in sorted(undeclared.items()):
        problems.append(Problem(name, PATH_MISSING, path.as_posix(), "; ".join(sorted(set(wheres)))))

    # Params.
    required = dict(needs.params)
    entries = params_entries(stage.get("params"))
    for item, where in sorted(required.items()):
        if not any(param_under(item, entry) for entry in entries):
            problems.append(Problem(name, PARAM_MISSING, item, where))
    for entry in entries:
        if not any(param_under(item, entry) or param_under(entry, item) for item in required):
            problems.append(Problem(name, PARAM_STALE, entry, f"{needs.module} never reads it"))
    return sorted(problems)


def check_pipeline(dvc: Mapping[str, Any], index: ProjectIndex) -> dict[str, list[Problem]]:
    return {name: check_stage(name, stage, index) for name, stage in dvc["stages"].items()}
