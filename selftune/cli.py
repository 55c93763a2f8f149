"""The ``selftune`` command line."""

from __future__ import annotations

import json
import logging
import sys
import warnings
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from selftune.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from selftune.bfcl.harness import BfclRun

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="An agent runtime that tunes its own local model.")
episodes_app = typer.Typer(no_args_is_help=True, help="Browse and export logged episodes.")
adapters_app = typer.Typer(no_args_is_help=True, help="List, activate and roll back tuned adapters.")
models_app = typer.Typer(no_args_is_help=True, help="Registered local models.")
eval_app = typer.Typer(no_args_is_help=True, help="Benchmark the model (BFCL).")
bench_app = typer.Typer(no_args_is_help=True, help="Performance benchmarks: variants timed side by side, ratios printed.")
app.add_typer(episodes_app, name="episodes")
app.add_typer(adapters_app, name="adapters")
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")

console = Console()
_state: dict[str, object] = {}

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (default configs/default.yaml).")]


@app.callback()
def _configure(
    config: ConfigOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
    _state["config"] = config


def _settings(model: str | None = None) -> Settings:
    settings = load_settings(_state.get("config"))  # type: ignore[arg-type]
    if model:
        settings.model.name = model
    return settings


def _runtime(model: str | None = None):
    from selftune.runtime import Runtime

    return Runtime(_settings(model))


# -- goals ----------------------------------------------------------------------------------


def _verifier(expect: str | None, check: str):
    from selftune.memory.records import Verifier

    return Verifier(kind=check, expected=expect) if expect is not None else None  # type: ignore[arg-type]


def _print_event(event) -> None:
    from selftune.agent.loop import AgentResult

    if isinstance(event, AgentResult):
        return
    message = event.message
    if event.kind == "plan":
        console.print(Text.assemble(("plan\n", "bold"), message.content))
    elif event.kind == "action" and message.tool_calls:
        for call in message.tool_calls:
            console.print(Text.assemble((f"→ {call.name} ", "cyan"), json.dumps(call.arguments, ensure_ascii=False)))
    elif event.kind == "action":
        console.print(Text.assemble(("✗ invalid tool call: ", "red"), str(event.error)))
    elif event.kind == "observation" and message.role == "tool":
        text = message.content if len(message.content) <= 300 else message.content[:300] + " …"
        console.print(Text.assemble((f"← {message.name} ", "green"), text))


def _run_goal(runtime, goal: str, verifier=None, quiet: bool = False):
    from selftune.agent.loop import AgentResult

    result = None
    for event in runtime.agent().iter_run(goal, verifier=verifier):
        if not quiet:
            _print_event(event)
        if isinstance(event, AgentResult):
            result = event
    return result


def _print_result(result) -> None:
    if result.status == "done":
        console.print(f"[bold]answer[/bold] {result.answer}")
    elif result.status == "limit":
        console.print(f"[yellow]stopped at the {result.limit} limit[/yellow]; best answer: {result.answer}")
    else:
        console.print(f"[red]failed[/red]: {result.error}")
    console.print(f"[dim]episode {result.episode_id} · {result.steps} steps · {result.wall_s:.1f}s[/dim]")


@app.command()
def run(
    goal: Annotated[str, typer.Argument(help="What the agent should achieve.")],
    model: Annotated[Optional[str], typer.Option(help="Model name (overrides the config).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the result as one JSON object.")] = False,
    expect: Annotated[Optional[str], typer.Option(help="Expected answer: adds a verifier reward.")] = None,
    check: Annotated[str, typer.Option(help="How --expect is checked: contains, exact, number, regex.")] = "contains",
) -> None:
    """Run one goal, streaming its steps."""
    runtime = _runtime(model)
    result = _run_goal(runtime, goal, _verifier(expect, check), quiet=as_json)
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json", include={"answer", "status", "episode_id", "steps", "limit", "error"})))
    else:
        _print_result(result)
    raise typer.Exit(1 if result.status == "failed" else 0)


@app.command()
def chat(
    model: Annotated[Optional[str], typer.Option(help="Model name (overrides the config).")] = None,
    local: Annotated[bool, typer.Option("--local", help="Run in this process even when a daemon is running.")] = False,
) -> None:
    """A REPL of goals and follow-ups. `+1` / `-1` rates the last answer; empty line or `exit` quits.

    Talks to the running daemon of this data dir when there is one (no --model then), else runs in-process."""
    from selftune.daemon.client import DaemonClient

    client = None if local or model else DaemonClient.discover(_settings())
    if client is not None:
        console.print(f"[dim]connected to the daemon at {client.base_url}[/dim]")
        _remote_chat(client)
        return
    runtime = _runtime(model)

    def run_local(goal: str) -> tuple[str, str | None]:
        result = _run_goal(runtime, goal)
        _print_result(result)
        return result.answer or "", result.episode_id

    _chat_loop(run_local, lambda episode, rating: _add_feedback(runtime, episode, rating, None))


def _chat_loop(run: Callable[[str], tuple[str, str | None]], rate: Callable[[str, str], None]) -> None:
    """Read goals until EOF or `exit`; follow-ups carry the last three goals and answers; `+1`/`-1`
    rate the last answer. ``run`` returns (answer, episode id)."""
    history: list[tuple[str, str]] = []
    last_episode: str | None = None
    while True:
        try:
            line = input("goal> ").strip()
        except EOFError:
            break
        if line in ("", "exit", "quit"):
            break
        if line in ("+1", "-1") and last_episode:
            rate(last_episode, line)
            continue
        context = "".join(f"Earlier goal: {g}\nEarlier answer: {a}\n" for g, a in history[-3:])
        answer, last_episode = run(f"{context}Follow-up goal: {line}" if context else line)
        history.append((line, answer))


def _print_remote_event(kind: str, data: dict) -> None:
    if kind == "plan":
        console.print(Text.assemble(("plan\n", "bold"), data.get("content", "")))
    elif kind == "tool_call" and data.get("name") != "finish":
        console.print(Text.assemble((f"→ {data['name']} ", "cyan"), json.dumps(data.get("arguments"), ensure_ascii=False)))
    elif kind == "observation":
        text = str(data.get("content", ""))
        console.print(Text.assemble((f"← {data.get('name')} ", "green"), text if len(text) <= 300 else text[:300] + " …"))
    elif kind == "step" and data.get("error") and data.get("step_kind") == "action":
        console.print(Text.assemble(("✗ invalid tool call: ", "red"), str(data["error"])))
    elif kind == "status" and data.get("status") in ("queued", "running"):
        console.print(f"[dim]{data['status']}{': ' + data['note'] if data.get('note') else ''}[/dim]")


def _follow_remote(client, goal_id: str, quiet: bool = False) -> dict:
    """Stream a daemon goal's events; returns its final record."""
    for _, kind, data in client.events(goal_id):
        if not quiet:
            _print_remote_event(kind, data)
    return client.goal(goal_id)


def _print_remote_result(record: dict) -> None:
    if record["status"] == "done":
        prefix = "[yellow]best answer at a limit[/yellow]" if record.get("episode_status") == "limit" else "[bold]answer[/bold]"
        console.print(f"{prefix} {record['answer']}")
    else:
        console.print(f"[red]{record['status']}[/red]: {record.get('error')}")
    console.print(f"[dim]goal {record['id']} · episode {record.get('episode_id')}[/dim]")


def _remote_chat(client) -> None:
    def run_remote(goal: str) -> tuple[str, str | None]:
        record = _follow_remote(client, client.submit(goal))
        _print_remote_result(record)
        return record.get("answer") or "", record.get("episode_id")

    def rate(episode: str, rating: str) -> None:
        rated = client.feedback(episode, rating)
        console.print(f"recorded {rating} for {rated['episode_id']}; score now {rated['score']:.2f}")

    _chat_loop(run_remote, rate)


@app.command()
def submit(
    goal: Annotated[str, typer.Argument(help="What the agent should achieve.")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow the goal's steps until it ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the goal record as JSON.")] = False,
    expect: Annotated[Optional[str], typer.Option(help="Expected answer: adds a verifier reward.")] = None,
    check: Annotated[str, typer.Option(help="How --expect is checked: contains, exact, number, regex.")] = "contains",
    key: Annotated[Optional[str], typer.Option("--key", help="Idempotency key: resubmitting returns the same goal.")] = None,
) -> None:
    """Queue a goal on the running daemon and print its id (with --wait: follow it; exit 1 if it fails)."""
    from selftune.daemon.client import ClientError, DaemonClient

    client = DaemonClient.discover(_settings())
    if client is None:
        raise ValueError("no daemon is running for this data dir: start one with `selftune daemon`")
    verifier = {"kind": check, "expected": expect} if expect is not None else None
    try:
        goal_id = client.submit(goal, verifier=verifier, idempotency_key=key)
        if not wait:
            typer.echo(json.dumps({"id": goal_id}) if as_json else goal_id)
            return
        record = _follow_remote(client, goal_id, quiet=as_json)
    except ClientError as error:
        raise ValueError(f"the daemon refused: {error.detail}") from None
    if as_json:
        typer.echo(json.dumps({k: record.get(k) for k in ("id", "status", "answer", "error", "episode_id", "episode_status")}))
    else:
        _print_remote_result(record)
    raise typer.Exit(0 if record["status"] == "done" else 1)


@app.command()
def daemon(
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (default daemon.host).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default daemon.port; 0 picks a free one).")] = None,
) -> None:
    """Serve the HTTP API and web chat, run queued goals and the scheduled jobs until SIGTERM/SIGINT."""
    from selftune.daemon.server import Daemon, DaemonError

    logging.getLogger("selftune").setLevel(logging.INFO)
    try:
        code = Daemon(_settings()).serve(host, port)
    except DaemonError as error:
        raise ValueError(str(error)) from None
    raise typer.Exit(code)


# -- episodes and feedback -----------------------------------------------------------------


@episodes_app.command("list")
def episodes_list(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    status: Annotated[Optional[str], typer.Option(help="Only this status.")] = None,
) -> None:
    """List episodes with their combined score."""
    table = Table("id", "status", "score", "origin", "adapter", "goal")
    for episode in _runtime().store.list(limit=limit, status=status):
        score = "-" if episode.score is None else f"{episode.score:.2f}"
        table.add_row(episode.id, episode.status, score, episode.origin, episode.adapter_version or "base", episode.goal[:60])
    console.print(table)


@episodes_app.command("show")
def episodes_show(episode_id: str) -> None:
    """Show one episode's transcript and rewards."""
    episode = _runtime().store.get(episode_id)
    console.print(f"[bold]{episode.id}[/bold] {episode.status} score={episode.score} model={episode.model_id} adapter={episode.adapter_version or 'base'}")
    console.print(f"goal: {episode.goal}\nanswer: {episode.answer}")
    for step in episode.steps:
        content = step.message.content if not step.message.tool_calls else json.dumps([c.to_openai() for c in step.message.tool_calls])
        meta = f" ({step.tokens_in}→{step.tokens_out} tok, {step.latency_s:.2f}s)" if step.tokens_out else ""
        console.print(f"[dim]{step.index:>2} {step.kind:<11} {step.message.role}{meta}[/dim]\n{content}", markup=True, highlight=False)
    for reward in episode.rewards:
        console.print(f"reward {reward.source}={reward.value:.2f} {reward.note or ''}")


@episodes_app.command("export")
def episodes_export(
    format: Annotated[str, typer.Option("--format", help="Only jsonl (OpenAI-style messages, TRL SFT format).")] = "jsonl",
    out: Annotated[Optional[Path], typer.Option(help="Output file (default stdout).")] = None,
    min_score: Annotated[Optional[float], typer.Option(help="Only episodes scoring at least this.")] = None,
) -> None:
    """Export episodes as JSONL chat transcripts."""
    if format != "jsonl":
        raise typer.BadParameter("only --format jsonl is supported", param_hint="--format")
    store = _runtime().store
    if out is None:
        count = store.export_jsonl(sys.stdout, min_score=min_score)
    else:
        with out.open("w") as handle:
            count = store.export_jsonl(handle, min_score=min_score)
    typer.echo(f"exported {count} episodes", err=True)


def _add_feedback(runtime, episode_id: str, rating: str, note: str | None) -> None:
    from selftune.runtime import RATINGS

    if rating.strip().lower() not in RATINGS:
        raise typer.BadParameter("rating must be +1 or -1 (or up/down)", param_hint="RATING")
    episode = runtime.record_feedback(episode_id, rating, note)
    console.print(f"recorded {rating} for {episode.id}; score now {episode.score:.2f}")


@app.command(context_settings={"ignore_unknown_options": True})
def feedback(
    episode_id: str,
    rating: Annotated[str, typer.Argument(help="+1 or -1 (or up/down).")],
    note: Annotated[Optional[str], typer.Option(help="Why.")] = None,
) -> None:
    """Rate an episode; late feedback changes its score and its chance to be trained on."""
    _add_feedback(_runtime(), episode_id, rating, note)


# -- tuning, adapters, reports ---------------------------------------------------------------


@app.command()
def tune(
    method: Annotated[Optional[str], typer.Option(help="lora, prompt or prefix (default from config).")] = None,
    force: Annotated[bool, typer.Option(
        help="Train even when a registered version was trained on the same examples and settings.")] = False,
) -> None:
    """Select good episodes, train an adapter, gate it on held-out goals, promote or reject it."""
    from selftune.tuning.pipeline import run_tuning_round

    outcome = run_tuning_round(_runtime(), method=method, force=force)
    console.print(f"[bold]{outcome.decision}[/bold]: {outcome.reason}")
    if outcome.report_dir:
        console.print(f"report: {outcome.report_dir / 'report.html'}")


@adapters_app.command("list")
def adapters_list() -> None:
    """Versions with status and held-out metrics; * marks the active one."""
    registry = _runtime().adapters
    active = registry.active_version()
    table = Table("", "version", "status", "method", "created", "metrics")
    for entry in registry.list():
        metrics = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.metrics.items())
        table.add_row("*" if entry.version == active else "", entry.version, entry.status, entry.method,
                      entry.created_at.strftime("%Y-%m-%d %H:%M"), metrics)
    console.print(table)
    best, latest = registry.best(), registry.latest()
    console.print(f"active: {active or 'base'}; best: {best.version if best else '-'}; "
                  f"latest: {latest.version if latest else '-'}")


@adapters_app.command("use")
def adapters_use(
    version: Annotated[str, typer.Argument(help="A promoted version, 'best', 'latest', or 'base'.")],
) -> None:
    """Activate a version (or the base weights)."""
    registry = _runtime().adapters
    target: str | None = version
    if version == "base":
        target = None
    elif version in ("best", "latest"):
        entry = registry.best() if version == "best" else registry.latest()
        if entry is None:
            raise typer.BadParameter(f"no promoted version to be {version!r}", param_hint="VERSION")
        target = entry.version
    registry.use(target, reason=f"selftune adapters use {version}")
    console.print(f"active: {target or 'base'}")


@adapters_app.command("rollback")
def adapters_rollback() -> None:
    """Re-activate the previously active version."""
    active = _runtime().adapters.rollback()
    console.print(f"active: {active or 'base'}")


@app.command()
def report(open_: Annotated[bool, typer.Option("--open", help="Open the HTML report in a browser.")] = False) -> None:
    """Print the path of the latest retraining report."""
    from selftune.tuning.report import latest_report

    directory = latest_report(_settings().reports_dir)
    if directory is None:
        console.print("no reports yet: run `selftune tune`")
        raise typer.Exit(1)
    html = directory / "report.html"
    typer.echo(str(html))
    if open_:
        webbrowser.open(html.resolve().as_uri())


@models_app.command("list")
def models_list() -> None:
    """Registered model names."""
    from selftune.agent.models import list_models

    for spec in list_models():
        typer.echo(f"{spec.name}\t{spec.description}")


@models_app.command("prepare")
def models_prepare(name: Annotated[Optional[str], typer.Argument(help="Model name (default from config).")] = None) -> None:
    """Assemble/convert a model into the cache now (otherwise done on first use)."""
    from selftune.agent.models import prepare_model

    settings = _settings(name)
    typer.echo(str(prepare_model(settings.model.name, settings.model_cache)))


# -- evaluation ------------------------------------------------------------------------------


@eval_app.command("bfcl")
def eval_bfcl(
    category: Annotated[list[str], typer.Option(help="BFCL category, e.g. simple_python, irrelevance (repeatable).")],
    limit: Annotated[Optional[int], typer.Option(help="Evaluate a seeded sample of this many questions per category.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    model: Annotated[Optional[str], typer.Option(help="Model name (overrides the config).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(exists=True, file_okay=False, help="PEFT adapter directory to activate.")] = None,
    unconstrained: Annotated[bool, typer.Option("--unconstrained", help="Free decoding, no grammar.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the full run (with per-question records) as JSON.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the questions already scored in --out (same model, seed and decoding).")] = False,
) -> None:
    """Score the local model on BFCL categories (greedy, BFCL AST rules)."""
    from selftune.agent.chat_models import build_chat_model
    from selftune.bfcl import category_kind
    from selftune.bfcl.harness import BfclRun, evaluate_category

    for name in category:
        category_kind(name)  # an unknown category fails before the model loads
    settings = _settings(model)
    earlier = _earlier_run(out, settings.model.name, seed, not unconstrained) if resume else None
    chat = build_chat_model(settings.model, settings.model_cache)
    if adapter is not None:
        if not hasattr(chat, "use_adapter"):
            raise typer.BadParameter("adapters need a local model", param_hint="--adapter")
        try:
            chat.use_adapter(adapter, adapter.name)
        except FileNotFoundError as error:
            raise typer.BadParameter(str(error), param_hint="--adapter") from None
    run = BfclRun(model=settings.model.name, limit=limit, seed=seed, constrained=not unconstrained, results=[])
    done: dict[str, dict] = {}
    if earlier is not None:  # earlier categories stay in the file until this run replaces them
        run.results = list(earlier.results)
        done = {result.category: {record.id: record for record in result.records} for result in earlier.results}
    table = Table("category", "n", "accuracy", "parse rate", "mean latency (s)", "mean tokens")
    for name in category:
        result = evaluate_category(chat, name, limit=limit, seed=seed, constrained=not unconstrained,
                                   done=done.get(name))
        run.results = [kept for kept in run.results if kept.category != name] + [result]
        table.add_row(result.category, str(result.n), f"{result.accuracy:.3f}", f"{result.parse_rate:.3f}",
                      f"{result.mean_latency_s:.2f}", f"{result.mean_output_tokens:.1f}")
        if out is not None:  # written after every category, so a long run keeps what it finished
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(run.model_dump_json(indent=1))
    console.print(table)
    if out is not None:
        console.print(f"wrote {out}")


def _earlier_run(out: Path | None, model: str, seed: int, constrained: bool) -> BfclRun | None:
    """The run already in ``out`` (``--resume``), checked to have the same settings."""
    from pydantic import ValidationError

    from selftune.bfcl.harness import BfclRun

    if out is None:
        raise typer.BadParameter("--resume needs --out", param_hint="--resume")
    if not out.exists():
        return None
    try:
        earlier = BfclRun.model_validate_json(out.read_text())
    except (ValidationError, ValueError) as error:
        raise typer.BadParameter(f"{out} is not a BFCL run file: {error}", param_hint="--out") from None
    if (earlier.model, earlier.seed, earlier.constrained) != (model, seed, constrained):
        raise typer.BadParameter(
            f"{out} holds a run of {earlier.model} (seed {earlier.seed}, constrained={earlier.constrained});"
            f" this one is {model} (seed {seed}, constrained={constrained})",
            param_hint="--resume",
        )
    return earlier


# -- performance benchmarks -------------------------------------------------------------------

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the full result as JSON only.")]


def _print_bench(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=1))
        return
    console.print_json(data={key: value for key, value in result.items() if key != "rows"})


@bench_app.command("inference")
def bench_inference(
    model: Annotated[Optional[str], typer.Option(help="Model name (overrides the config).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Recorded agent calls to replay.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """Agent step on the local model: naive full-prompt generate against prefix caching and drafted decoding."""
    from selftune.bench.inference import run_inference_bench

    _print_bench(run_inference_bench(_settings(model), steps=steps), as_json)


@bench_app.command("memory")
def bench_memory(
    size: Annotated[int, typer.Option(min=100, help="Memories to ingest before querying.")] = 100_000,
    queries: Annotated[int, typer.Option(min=10)] = 200,
    as_json: JsonFlag = False,
) -> None:
    """Chroma memory with the local embedder: batched vs single ingest, fresh vs cached query latency."""
    from selftune.bench.memory import run_memory_bench

    _print_bench(run_memory_bench(size=size, queries=queries), as_json)


@bench_app.command("loop")
def bench_loop(
    goals: Annotated[int, typer.Option(min=2, help="Scripted goals per variant.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """The agent loop's overhead per step (all but model calls), without and with vector memory."""
    from selftune.bench.loop import run_loop_bench

    _print_bench(run_loop_bench(goals=goals), as_json)


@bench_app.command("self-improvement")
def bench_self_improvement(
    model: Annotated[Optional[str], typer.Option(help="Model name (overrides the config).")] = None,
    method: Annotated[Optional[str], typer.Option(help="lora, prompt or prefix (default from config).")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Collect-tune-gate rounds after the base evaluation.")] = 3,
    attempts: Annotated[int, typer.Option(min=1, help="Attempts per train goal per round (first greedy).")] = 4,
    eval_limit: Annotated[int, typer.Option(min=1, help="Seeded questions per never-trained suite.")] = 50,
    train_per_category: Annotated[Optional[int], typer.Option(min=1, help="Grow the committed split's train "
                                                              "questions to this many per category (held-out "
                                                              "unchanged).")] = None,
    abstain_goals: Annotated[int, typer.Option(min=0, help="Abstention goals (train questions offered "
                                               "unrelated functions) collected each round.")] = 20,
    near_miss_goals: Annotated[int, typer.Option(min=0, help="Further abstention goals offered the closest-reading "
                                                 "functions that do not fit (near misses).")] = 0,
    call_required_attempts: Annotated[int, typer.Option(min=0, help="Further attempts per train goal with the "
                                                        "no-call answer withheld (first greedy); verified "
                                                        "calls become training data.")] = 0,
    calibration_goals: Annotated[int, typer.Option(min=0, help="live_irrelevance questions never evaluated "
                                                   "(and as many call questions outside the split) that set "
                                                   "each candidate's no-call bias; 0: no bias.")] = 0,
    kl_weight: Annotated[Optional[float], typer.Option(min=0.0, help="KL-to-base weight on replayed "
                                                       "conversations (default from config).")] = None,
    continue_active: Annotated[bool, typer.Option("--continue", help="Start each candidate from the active "
                                                  "adapter instead of the base weights.")] = False,
    no_replay: Annotated[bool, typer.Option("--no-replay", help="Ablation: replay nothing.")] = False,
    no_gate: Annotated[bool, typer.Option("--no-gate", help="Ablation: promote every candidate.")] = False,
    fewshot: Annotated[Optional[int], typer.Option(min=1, help="Baseline instead of tuning: this many retrieved "
                                                   "solved episodes as few-shot turns, no weight change.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the run as JSON (after every round).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="Keep episodes and adapters here (default: a temp dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Go on with the run recorded in --out, whose work is in "
                                         "--work-dir (same options; the learning rate and steps may change).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Self-tuning on BFCL goals with the checker as reward: per-round accuracy on held-out and untrained suites."""
    from pydantic import ValidationError

    from selftune.bench.self_improvement import (
        SPLIT_FILE,
        SelfImprovementRun,
        Split,
        run_fewshot_baseline,
        run_self_improvement,
        widen_train,
    )
    from selftune.tuning.methods import get_method

    settings = _settings(model)
    if method:
        try:
            settings.tuning.method = get_method(method).name  # type: ignore[assignment]
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--method") from None
    if kl_weight is not None:
        settings.tuning.kl_weight = kl_weight
    settings.tuning.continue_from_active |= continue_active
    split = Split.model_validate_json(SPLIT_FILE.read_text())
    if train_per_category is not None:
        try:
            split = widen_train(split, train_per_category)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--train-per-category") from None

    recorded = None
    if resume:
        if fewshot is not None:
            raise typer.BadParameter("the few-shot baseline has a single round; run it again", param_hint="--resume")
        if out is None or not out.is_file():
            raise typer.BadParameter("--resume needs the recorded run in --out", param_hint="--resume")
        try:
            recorded = SelfImprovementRun.model_validate_json(out.read_text())
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise typer.BadParameter(f"{out.name} is not a recorded run: {first['msg']}" + (f" ({where})" if where else ""),
                                     param_hint="--resume") from None

    def save(run) -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(run.model_dump_json(indent=1))

    def progress(run) -> None:
        last = run.rounds[-1]
        typer.echo(f"round {last.round}: {last.decision}; held-out {last.candidate.get('heldout', 0.0):.2f}, "
                   f"irrelevance {last.candidate.get('irrelevance', 0.0):.2f}; {last.seconds}", err=True)
        save(run)

    if fewshot is not None:
        run = run_fewshot_baseline(settings, attempts=attempts, eval_limit=eval_limit, shots=fewshot,
                                   abstain_goals=abstain_goals, near_miss_goals=near_miss_goals, split=split,
                                   work_dir=work_dir, on_round=progress)
    else:
        run = run_self_improvement(settings, rounds=rounds, attempts=attempts, eval_limit=eval_limit,
                                   replay=not no_replay, use_gate=not no_gate, abstain_goals=abstain_goals,
                                   near_miss_goals=near_miss_goals, call_required_attempts=call_required_attempts,
                                   calibration_count=calibration_goals, split=split, work_dir=work_dir,
                                   resume=recorded, on_round=progress)
    save(run)
    _print_bench(run.model_dump(mode="json"), as_json)


@app.command()
def demo(
    model: Annotated[Optional[str], typer.Option(help="Model name (overrides the config).")] = None,
    goals_file: Annotated[Path, typer.Option("--goals", help="Goal file to run before tuning.")] = Path("configs/demo.yaml"),
) -> None:
    """Run the demo goals, one tuning round and a report; print where everything went."""
    from selftune.demo import run_demo

    run_demo(_runtime(model), goals_file, console)


def main() -> None:
    """Console entry point: known user errors print one line and exit 2."""
    from selftune.agent.loop import GoalError
    from selftune.tuning.adapters import RegistryError

    try:
        app()
    except (ConfigError, GoalError, RegistryError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        console.print(f"[red]error:[/red] {message}")
        sys.exit(2)
