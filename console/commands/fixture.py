"""`quantdeck fixture`: build a tiny real DeepSeek checkpoint laid out as the releases are (random weights, or
with --trained a V3 trained on the standard library's Python sources)."""

from __future__ import annotations

import click


@click.command("fixture")
@click.option("--family", type=click.Choice(["deepseek-v3", "deepseek-v4"]), default="deepseek-v3", show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp8"]), default="bf16", show_default=True,
              help="fp8: V3 FP8 block-128 + weight_scale_inv; V4 FP8+UE8M0 attention, MXFP4 experts")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="directory to create")
@click.option("--layers", type=int, default=2, show_default=True, help="decoder layers")
@click.option("--experts", type=int, default=4, show_default=True, help="routed experts per MoE layer")
@click.option("--hidden", type=int, default=128, show_default=True,
              help="hidden size (e.g. 320 for partial 128-blocks)")
@click.option("--moe-inter", type=int, default=64, show_default=True, help="expert intermediate size")
@click.option("--mtp", is_flag=True, help="add the MTP layer (V3 model.layers.{L}, V4 mtp.0)")
@click.option("--shard-mb", type=float, default=None, help="shard size in MiB (default: about 4 shards)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--v4-experts", type=click.Choice(["mxfp4", "fp8"]), default="mxfp4", show_default=True,
              help="V4 fp8 routed experts: MXFP4 as released, or FP8 (the uniform-FP8 repackage)")
@click.option("--v4-names", type=click.Choice(["native", "transformers"]), default="native", show_default=True,
              help="V4 tensor names: DeepSeek's native ones, or transformers' save_pretrained ones (model. prefix)")
@click.option("--trained", is_flag=True,
              help="train a V3 with MTP on the standard library's Python sources; writes OUT/bf16, OUT/fp8, "
                   "samples-heldout.json, samples-calibration.json and training.json (--layers, --hidden, "
                   "--moe-inter, --seed apply; --experts defaults to 8)")
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True, help="--trained: AdamW steps")
@click.option("--force", is_flag=True, help="replace --out if it exists")
def fixture_cmd(family, dtype, out, layers, experts, hidden, moe_inter, mtp, shard_mb, seed, v4_experts, v4_names,
                trained, steps, force):
    """Build a tiny real DeepSeek V3/V4 checkpoint to try quantdeck on."""
    from engine.api import build_fixture, checkpoint_totals

    if trained:
        return _trained(family, out, layers, experts, hidden, moe_inter, shard_mb, seed, steps, force)

    path = build_fixture(out, family=family, dtype=dtype, layers=layers, experts=experts, hidden=hidden,
                         moe_inter=moe_inter, mtp=mtp, shard_mb=shard_mb, seed=seed, v4_experts=v4_experts,
                         v4_names=v4_names, overwrite=force)
    tensors, shards, nbytes = checkpoint_totals(path)
    click.echo(f"built {family} {dtype} fixture: {tensors} tensors in {shards} shards, {nbytes / 1e6:.2f} MB",
               err=True)
    click.echo(str(path))


def _trained(family, out, layers, experts, hidden, moe_inter, shard_mb, seed, steps, force):
    from console.commands.convert import _StderrProgress
    from engine.api import build_trained_fixture, event_sink
    from engine.core.errors import UsageError

    if family != "deepseek-v3":
        raise UsageError("--trained builds deepseek-v3 only", at="family", hint="drop --family or use deepseek-v3")
    src = click.get_current_context().get_parameter_source("experts")
    experts = 8 if src is click.core.ParameterSource.DEFAULT else experts
    path = build_trained_fixture(out, steps=steps, layers=layers, experts=experts, hidden=hidden,
                                 moe_inter=moe_inter, seed=seed, shard_mb=shard_mb, overwrite=force,
                                 sink=event_sink(_StderrProgress(), stage="fixture"))
    click.echo(str(path))


COMMANDS = (fixture_cmd,)
