"""Issue 9, memory flat in n: the local runner buffers a main input whole while it waits on a
side input, so no transform that consumes the training blocks (before they are aggregated by
a GroupByKey) may take a side input. This walks the job graph, built but not run, from every
read of the training input (pass 1 ``ReadTrain``, pass 2 ``FeaturizeTrain``, the re-reads of
later fit / group passes) and checks it; only the file elements wait on side inputs."""

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import run as run_lib
from pipelines.options import job_config

GBK = common_urns.primitives.GROUP_BY_KEY.urn
PARDO = common_urns.primitives.PAR_DO.urn


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from pipelines import demo
    d = tmp_path_factory.mktemp("graph")
    xtr, ytr, xq, yq, _ = demo.make_data(seed=0, n_train=50)
    demo.train_model(xtr, ytr, seed=0, epochs=1).save(str(d / "model.keras"))
    g = np.array(["a", "b"] * 25)
    np.savez(d / "train.npz", x=xtr, y=ytr, g=g)
    np.savez(d / "queries.npz", x=xq[:5], y=yq[:5])
    return d


def _leaves(proto):
    return {tid: t for tid, t in proto.components.transforms.items() if not t.subtransforms}


def _side_inputs(t):
    if t.spec.urn != PARDO:
        return []
    return list(beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload).side_inputs)


def _buffered(proto, start_prefixes):
    """Leaf transforms that consume, before any GroupByKey, the outputs of a block-producing
    step named by ``start_prefixes`` and take a side input computed from those same outputs
    (the runner cannot fuse them with the step: it buffers their input whole)."""
    leaves = _leaves(proto)
    main, every = {}, {}
    for tid, t in leaves.items():
        sides = _side_inputs(t)
        for tag, pc in t.inputs.items():
            every.setdefault(pc, []).append(tid)
            if tag not in sides:
                main.setdefault(pc, []).append(tid)
    bad = []
    for start in [t for t in leaves.values()
                  if any(t.unique_name.startswith(p) for p in start_prefixes)]:
        outs = list(start.outputs.values())
        reach, stack = set(), list(outs)
        while stack:  # everything computed from the start's outputs
            pc = stack.pop()
            if pc not in reach:
                reach.add(pc)
                stack += [o for tid in every.get(pc, []) for o in leaves[tid].outputs.values()]
        seen, stack = set(), list(outs)
        while stack:  # the start's fused consumers, up to the first GroupByKey
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            for tid in main.get(pc, []):
                t = leaves[tid]
                if t.spec.urn == GBK:
                    continue
                if any(t.inputs[tag] in reach for tag in _side_inputs(t)):
                    bad.append(t.unique_name)
                stack.extend(t.outputs.values())
    return sorted(set(bad))


@pytest.mark.parametrize("flags", [
    ["--solver=arnoldi", "--rank=4", "--arnoldi_iter=8"],
    ["--solver=ekfac"],
    ["--solver=exact", "--group_key=g", "--group_order=2"],
    ["--solver=exact", "--group_key=g", "--group_order=newton"],
    ["--solver=arnoldi", "--rank=4", "--arnoldi_iter=8", "--group_key=g", "--examples_top=3",
     "--sample_rows=5"],
])
def test_no_training_block_waits_on_a_side_input(inputs, tmp_path, flags):
    d = inputs
    opts = PipelineOptions([f"--model={d}/model.keras", f"--train=npz:{d}/train.npz",
                            f"--queries=npz:{d}/queries.npz", f"--output={tmp_path}/out",
                            "--k=3"] + flags)
    config = run_lib.validate(job_config(opts))
    p = beam.Pipeline(options=opts)
    run_lib.build(p, config)
    proto = p.to_runner_api()
    names = [t.unique_name for t in _leaves(proto).values()]
    starts = ["ReadTrain/Read", "FeaturizeTrain/Featurize"] + sorted(
        {n.rsplit("/", 1)[0] + "/" for n in names if "Reread" in n and n.endswith("/Read")})
    assert _buffered(proto, starts) == []
    # ... while it does see what still waits: the query blocks (few) wait for the artifact.
    assert any(n.startswith("FeaturizeQueries/") for n in _buffered(proto, ["ReadQueries/Read"]))
