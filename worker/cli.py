"""The `ksr` command: one entry point for data, training, evaluation, the broker and the worker.

Each subcommand imports what it needs lazily, so `ksr train` never loads Faust and `ksr broker`
never loads PyTorch. `--json` prints exactly one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _cmd_data(args: argparse.Namespace) -> int:
    from model import data

    if args.data_command == "fetch":
        path = data.fetch(args.name)
        print(path)
        return 0
    if args.data_command == "stats":
        stats = data.load(args.data).stats()
        if args.json:
            _print_json(stats)
        else:
            print(json.dumps(stats, indent=1))
        return 0
    if args.data_command == "synth":
        from model import synth

        result = synth.synth_with_stats(
            args.out, users=args.users, items=args.items, events=args.events, seed=args.seed
        )
        if args.json:
            _print_json(result.as_dict())
        else:
            print(result.path)
        return 0
    raise SystemExit(f"unknown data command {args.data_command!r}")


def _cmd_train(args: argparse.Namespace) -> int:
    from model import data, train
    from model.ksr import KSRConfig
    from model.transe import TransEConfig

    try:  # settings are checked before any data is read or model trained
        config = train.TrainConfig(
            model=args.model, epochs=args.epochs, patience=args.patience, batch_users=args.batch_users,
            lr=args.lr, weight_decay=args.weight_decay, loss=args.loss, seed=args.seed,
            relations=args.relations, threads=args.threads, max_minutes=args.max_minutes, ema=args.ema,
            seen_penalty=args.seen_penalty, lr_decay=args.lr_decay, lr_patience=args.lr_patience,
            item_init_std=args.item_init_std, max_len=args.max_len, label_smoothing=args.label_smoothing,
            future_targets=args.future_targets, future_decay=args.future_decay, shuffle_ties=args.shuffle_ties,
        )
        model_config = KSRConfig(  # the catalog's size is the data's, set once it is read
            n_items=1, n_relations=0, kb_dim=args.kb_dim, item_dim=args.item_dim, hidden_dim=args.hidden_dim,
            out_dim=args.out_dim, hops=args.hops, key_hashing=args.key_hashing, gamma=args.gamma,
            write_transform=args.write_transform, dropout=args.dropout, hidden_dropout=args.hidden_dropout,
            score_temperature=args.score_temperature,
        )
    except ValueError as error:
        print(f"ksr train: {error}", file=sys.stderr)
        return 2
    dataset = data.load(args.data)
    model_config = dataclasses.replace(model_config, n_items=dataset.n_items)
    transe = TransEConfig(dim=args.kb_dim, norm=args.transe_norm, epochs=args.transe_epochs, seed=args.seed)
    meta = train.train(dataset, args.out, config, model_config, transe)
    summary = {"checkpoint": str(args.out), "model": args.model, **meta["metrics"],
               "train_seconds": meta.get("train_seconds"), "epochs_run": meta.get("epochs_run")}
    if args.json:
        _print_json(summary)
    else:
        print(json.dumps(summary, indent=1))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from model import checkpoint, data, evaluate

    loaded = checkpoint.load(args.checkpoint)
    dataset = data.load(args.data)
    if args.protocol == "loo":
        result = evaluate.evaluate_loo(loaded, dataset)
    else:
        from model import prequential

        result = prequential.evaluate_stream(loaded, dataset, plot=args.plot, train_epochs=args.epochs)
    if args.json:
        _print_json(result)
    else:
        print(json.dumps(result, indent=1))
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from model.serving import Recommender

    recommender = Recommender.load(args.checkpoint)
    tokens = [t for t in args.items.split(",") if t]
    try:
        history = recommender.lookup(tokens)
    except KeyError as error:
        raise SystemExit(f"ksr recommend: {error.args[0]}") from None
    state = recommender.replay([history])
    (result,) = recommender.rank(state, [history], args.k)
    payload = {"items": result.items, "scores": result.scores, "explanation": result.explanation,
               "model_version": recommender.version, "history": tokens}
    if args.json:
        _print_json(payload)
    else:
        for rank, (item, score) in enumerate(zip(result.items, result.scores), 1):
            print(f"{rank:3d}. item {item:>8}  score {score:.4f}")
        print("why:", ", ".join(f"{e['relation']} {e['weight']:.2f}" for e in result.explanation[:5]))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker import app

    return app.run(checkpoint=args.checkpoint, loglevel=args.loglevel)


def _cmd_replay(args: argparse.Namespace) -> int:
    from worker import replay

    sent = replay.replay(args.data, rate=args.rate, limit=args.limit, skip=args.skip)
    print(f"replayed {sent} events", file=sys.stderr)
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    from worker import replay

    for message in replay.tail(args.topic, args.n, args.timeout):
        if args.json:
            _print_json(message)
            continue
        if "items" not in message:
            print(json.dumps(message))
            continue
        why = ", ".join(f"{e['relation'].rsplit('.', 1)[-1]} {e['weight']:.2f}" for e in message["explanation"][:3])
        print(f"user {message['user_id']:>6} after {message['event_id']}: {' '.join(message['items'])}"
              f"  (model v{message['model_version']}; why: {why})")
    return 0


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _finite_number(text: str, zero_allowed: bool) -> float:
    """A finite number above 0 (or, with `zero_allowed`, at least 0), for the argparse types below."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    above_floor = value >= 0 if zero_allowed else value > 0  # NaN is neither
    if not (above_floor and value < float("inf")):
        bound = "of at least 0" if zero_allowed else "above 0"
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, not {text}")
    return value


def _positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    return _finite_number(text, zero_allowed=False)


def _non_negative(text: str) -> float:
    """An argparse type: a finite number of at least 0."""
    return _finite_number(text, zero_allowed=True)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "step":
        from model.bench import bench_step

        result = bench_step(checkpoint=args.checkpoint, threads=args.threads, n_items=args.items + 1)
    elif args.bench == "throughput":
        from worker.bench import bench_throughput

        result = bench_throughput(checkpoint=args.checkpoint, events=args.events, data=args.data,
                                  timeout=args.timeout, profile=args.profile, latency_rate=args.latency_rate,
                                  latency_events=args.latency_events, workers=args.workers,
                                  partitions=args.partitions)
    elif args.bench == "batches":
        from worker.bench_batches import bench_batches
        from worker.config import Settings

        result = bench_batches(checkpoint=str(args.checkpoint or Settings.from_env().checkpoint), data=args.data,
                               events=args.events, partitions=args.partitions, batch_size=args.batch_size)
    elif args.bench == "faults":
        from worker import broker, faults
        from worker.config import Settings

        settings = Settings.from_env()
        result = faults.run_all(str(args.checkpoint or settings.checkpoint), broker.bootstrap_servers())
    else:
        raise SystemExit(f"unknown benchmark {args.bench!r}")
    if args.json:
        _print_json(result)
    else:
        print(json.dumps(result, indent=1))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from worker import finetune

    return finetune.run(once=args.once)


def _cmd_broker(args: argparse.Namespace) -> int:
    from worker import broker

    return broker.main(args.action)


def _defaults(settings: type) -> dict:
    """A settings dataclass's field defaults, by field name (fields without one are left out)."""
    return {f.name: f.default for f in dataclasses.fields(settings) if f.default is not dataclasses.MISSING}


def build_parser() -> argparse.ArgumentParser:
    from model import config  # plain dataclasses, no PyTorch

    parser = argparse.ArgumentParser(prog="ksr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="fetch and prepare data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download, verify and cache a named data set")
    f.add_argument("name", choices=["ml-100k"])
    f = data_sub.add_parser("stats", help="counts, and how close in time each user's consecutive events are")
    f.add_argument("--data", default="ml-100k", help="ml-100k or a folder of RecBole atomic files")
    f.add_argument("--json", action="store_true")
    f = data_sub.add_parser(
        "synth", help="write a synthetic data set (knowledge graph of ml-100k's shape) for scale tests"
    )
    f.add_argument("--out", required=True, help="folder to write (NAME.inter, NAME.kg, NAME.link)")
    f.add_argument("--users", type=int, default=1_000_000, help="users; each has at least one event")
    f.add_argument("--items", type=_at_least_one, default=100_000, help="items; each has at least one event")
    f.add_argument("--events", type=_at_least_one, default=None, help="events (default: max(users, items))")
    f.add_argument("--seed", type=int, default=7, help="same seed, same bytes")
    f.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data)

    # Every default is the settings dataclass's own (model/config.py), so `ksr train` with no flags
    # and KSRConfig / TrainConfig / TransEConfig built in code train the same model.
    model_d, train_d, transe_d = (_defaults(c) for c in (config.KSRConfig, config.TrainConfig, config.TransEConfig))
    p = sub.add_parser("train", help="train TransE + KSR (or gru4rec, pop) and write a checkpoint")
    p.add_argument("--data", default="ml-100k", help="ml-100k or a folder of RecBole atomic files")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--model", choices=["ksr", "gru4rec", "pop"], default=train_d["model"])
    p.add_argument("--seed", type=int, default=train_d["seed"])
    p.add_argument("--epochs", type=int, default=train_d["epochs"])
    p.add_argument("--patience", type=int, default=train_d["patience"], help="early stop after N epochs without gain")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap on training")
    p.add_argument("--batch-users", type=int, default=train_d["batch_users"])
    p.add_argument("--lr", type=float, default=train_d["lr"])
    p.add_argument("--lr-decay", type=float, default=train_d["lr_decay"],
                   help="multiply the learning rate by this after --lr-patience epochs without a "
                        "validation gain (0 = constant rate)")
    p.add_argument("--lr-patience", type=int, default=train_d["lr_patience"])
    p.add_argument("--max-len", type=int, default=train_d["max_len"],
                   help="train on windows: targets in runs of this many, each fed up to this many "
                        "earlier items (0 = whole sequences; evaluation keeps the whole history)")
    p.add_argument("--weight-decay", type=float, default=train_d["weight_decay"])
    p.add_argument("--item-init-std", type=float, default=train_d["item_init_std"],
                   help="initial item embeddings ~ N(0, std^2) (1: the scale of PyTorch's default)")
    p.add_argument("--ema", type=float, default=train_d["ema"],
                   help="keep an exponential moving average of the weights (decay per step; 0 = off)")
    p.add_argument("--loss", choices=["ce", "bpr"], default=train_d["loss"])
    p.add_argument("--seen-penalty", type=float, default=train_d["seen_penalty"],
                   help="ce only: also penalise the probability of items the user already consumed, "
                        "weight -log(1 - P(seen)) by this (training only; 0 = off)")
    p.add_argument("--future-targets", type=int, default=train_d["future_targets"],
                   help="ce only: train each position towards this many next items, the j-th after the "
                        "next weighted --future-decay**j (1 = the next item only)")
    p.add_argument("--future-decay", type=float, default=train_d["future_decay"])
    p.add_argument("--shuffle-ties", action=argparse.BooleanOptionalAction, default=train_d["shuffle_ties"],
                   help="each epoch, shuffle the order of a user's training events that share a timestamp")
    p.add_argument("--label-smoothing", type=float, default=train_d["label_smoothing"],
                   help="ce only: the target keeps 1 - this of the loss, the rest spread over all items (0 = off)")
    p.add_argument("--relations", type=int, default=train_d["relations"], help="memory relations, by item coverage")
    p.add_argument("--threads", type=_at_least_one, default=train_d["threads"])
    p.add_argument("--item-dim", type=int, default=model_d["item_dim"])
    p.add_argument("--hidden-dim", type=int, default=model_d["hidden_dim"])
    p.add_argument("--out-dim", type=int, default=model_d["out_dim"])
    p.add_argument("--kb-dim", type=int, default=model_d["kb_dim"])
    p.add_argument("--hops", type=int, default=model_d["hops"], help="memory reading hops (1 = KSR as published)")
    p.add_argument("--key-hashing", action=argparse.BooleanOptionalAction, default=model_d["key_hashing"])
    p.add_argument("--gamma", type=float, default=model_d["gamma"])
    p.add_argument("--write-transform", action=argparse.BooleanOptionalAction, default=model_d["write_transform"],
                   help="the authors' tanh(W e + b) before the memory write")
    p.add_argument("--dropout", type=float, default=model_d["dropout"], help="on item embeddings (training only)")
    p.add_argument("--hidden-dropout", type=float, default=model_d["hidden_dropout"],
                   help="on the GRU outputs before scoring (training only)")
    p.add_argument("--score-temperature", type=_non_negative, default=model_d["score_temperature"],
                   help="score = cos(p, s) / this: f and g end in L2 normalisation (0 = the plain dot product)")
    p.add_argument("--transe-norm", type=int, choices=[1, 2], default=transe_d["norm"])
    p.add_argument("--transe-epochs", type=int, default=transe_d["epochs"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint (leave-one-out or prequential)")
    p.add_argument("--data", default="ml-100k")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--protocol", choices=["loo", "stream"], default="loo")
    p.add_argument("--plot", default=None, help="PNG path for the prequential HR@10 plot")
    p.add_argument("--epochs", type=_at_least_one, default=None,
                   help="stream protocol: epochs on the prefix (default: the checkpoint's best epoch)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("recommend", help="top-k and explanation for a history of item ids")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--items", required=True, help="comma-separated item ids, oldest first")
    p.add_argument("--k", type=_at_least_one, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_recommend)

    p = sub.add_parser("worker", help="run the Faust stream worker (Procfile `worker:`)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: $KSR_CHECKPOINT)")
    p.add_argument("--loglevel", default="warning")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("replay", help="produce a data set's events into the interactions topic")
    p.add_argument("--data", default="ml-100k")
    p.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="stop after the first N events of the data set")
    p.add_argument("--skip", type=int, default=0, help="skip the first N events")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("tail", help="print the latest messages of the recommendations topic")
    p.add_argument("--topic", default=None, help="topic (default: $KSR_TOPIC_RECOMMENDATIONS)")
    p.add_argument("-n", type=int, default=5, help="how many of the latest messages")
    p.add_argument("--timeout", type=_positive, default=5.0, help="seconds to wait for messages")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_cmd_tail)

    p = sub.add_parser("bench", help="benchmarks that print their figures")
    p.add_argument("bench", choices=["step", "throughput", "batches", "faults"])
    p.add_argument("--events", type=_at_least_one, default=20000, help="throughput: backlog size; batches: events run")
    p.add_argument("--checkpoint", default=None, help="time this checkpoint (default: ml-100k-sized KSR)")
    p.add_argument("--threads", type=_at_least_one, default=1, help="PyTorch threads (the worker uses 1)")
    p.add_argument("--items", type=_at_least_one, default=1682,
                   help="step: catalog size of the random KSR timed when no --checkpoint is given")
    p.add_argument("--data", default="ml-100k", help="throughput, batches: events from ml-100k or a data folder "
                   "(e.g. from `ksr data synth`; the checkpoint must be trained on its catalog)")
    p.add_argument("--timeout", type=_positive, default=600.0, help="throughput: seconds allowed per phase")
    p.add_argument("--latency-rate", type=_positive, default=None,
                   help="throughput: feed the latency phase at this many events/s (default: half the worker's "
                   "saturated rate); a fixed rate compares builds whose saturated rates differ")
    p.add_argument("--latency-events", type=_at_least_one, default=3000,
                   help="throughput: events in the latency phase (at most ~30 s of them)")
    p.add_argument("--partitions", type=_at_least_one, default=4,
                   help="throughput: partitions of the benchmark's topics; batches: partitions the events are keyed over")
    p.add_argument("--workers", type=_at_least_one, default=1,
                   help="throughput: worker processes in one consumer group, and as many raw pipe processes")
    p.add_argument("--batch-size", type=_at_least_one, default=256, help="batches: events per batch (KSR_BATCH_SIZE)")
    p.add_argument("--profile", default=None, help="throughput: cProfile the worker into this file and "
                   "summarise it in the output (profiling slows the worker down)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("finetune", help="fine-tune from the replayed stream (Procfile `finetune:`)")
    p.add_argument("--once", action="store_true", help="run one round, print its JSON result, exit")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("broker", help="local single-node Apache Kafka (KRaft) on 127.0.0.1")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=_cmd_broker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as error:
        # Data, checkpoint and config problems carry a message that says what to fix.
        from model.checkpoint import CheckpointError
        from model.data import DataError

        if isinstance(error, (DataError, CheckpointError)):
            print(f"ksr {args.command}: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
