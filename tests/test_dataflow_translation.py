"""The real job graph, translated by Beam's DataflowRunner for GPU workers, offline.

We build the job exactly as ``pipelines.run`` does (``make_pipeline`` + ``build``; ``run()``
itself would check and write ``gs://`` paths on the driver and then poll the service) with
``--runner=DataflowRunner`` and the GPU worker flags of ``deploy/dataflow/README.md``, call
``p.run()``, and inspect what Beam would have sent to Dataflow.

Beam's own ``--dry_run=True`` (TestOptions) stops before the Dataflow ``Environment`` (worker
pool, machine type, container images, experiments, service options) is built, so it cannot show
the GPU configuration. Instead the whole submission path runs (``DataflowRunner.run_pipeline`` ->
``DataflowApplicationClient.create_job`` -> ``create_job_description`` (image overrides,
artifact staging, Environment) -> ``submit_job_description`` (``CreateJobRequest``)) and only
the calls that would leave this machine are replaced:

* ``DataflowApplicationClient.stage_file``: the GCS upload of staged files (pipeline.pb and
  artifacts) -> kept in memory, so we can read the graph that would have been uploaded;
* ``JobsV1Beta3Client.create_job``: the Dataflow API RPC -> records the ``CreateJobRequest``
  and answers with a job id;
* ``GcsIO.is_soft_delete_enabled``: the bucket-metadata GET the option validator makes for
  ``--temp_location`` -> False;
* Application Default Credentials: recorded as "none" up front (as tests/test_gcs.py does);
  offline Beam ends there anyway (anonymous), after ~25 s of retries.

A socket guard (``getaddrinfo`` and ``connect``) records any other attempt to reach the network,
and the test fails if there was one.

The last two tests keep deploy/ honest: the Flex Template metadata and the Cloud Scheduler launch
body name real options and parse as Dataflow API messages, and deploy/dataflow/launch.py turns
template parameters into arguments the pipeline accepts.
"""

import argparse
import datetime
import hashlib
import importlib.util
import json
import pathlib
import re
import socket

import numpy as np
import pytest
from apache_beam.internal.gcp import auth
from apache_beam.io.gcp import gcsio
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  SetupOptions)
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.internal import apiclient
from google.cloud import dataflow  # google-cloud-dataflow-client, part of apache-beam[gcp]

from pipelines import run as run_lib
from pipelines.options import InfluenceOptions, job_config

IMAGE = "gcr.io/p/influence-worker:1"
ACCELERATOR = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
MACHINE = "n1-standard-8"
GPU_FLAGS = [
    "--runner=DataflowRunner", "--project=test-project", "--region=us-central1",
    "--temp_location=gs://bucket/tmp", f"--sdk_container_image={IMAGE}",
    f"--dataflow_service_options={ACCELERATOR}",
    "--experiments=no_use_multiple_sdk_containers", f"--machine_type={MACHINE}",
]
STAGE_LABELS = ("ReadTrain", "ReadQueries", "FitMethod", "FeaturizeTrain", "FeaturizeQueries",
                "Score", "MergeTopK", "WriteTables", "Gather")
FAKE_JOB_ID = "2030-01-01_00_00_00-1234567890"


@pytest.fixture
def inputs(tmp_path):
    """A real small .keras model (digits MLP, 1 epoch on 50 examples) and tiny .npz inputs."""
    from pipelines import demo
    xtr, ytr, xq, yq, _ = demo.make_data(seed=0, n_train=50)
    model = demo.train_model(xtr, ytr, seed=0, epochs=1)
    model.save(str(tmp_path / "model.keras"))
    np.savez(tmp_path / "train.npz", x=xtr, y=ytr)
    np.savez(tmp_path / "queries.npz", x=xq[:5], y=yq[:5])
    return tmp_path


@pytest.fixture
def offline_dataflow(monkeypatch):
    """Replaces the calls that would leave the machine; records what they were given."""
    rec = dict(uploads={}, requests=[], soft_delete_checks=[], connects=[])

    # Offline, a name lookup fails before any connect: guard both.
    def no_lookup(host, *args, **kwargs):
        rec["connects"].append(host)
        raise socket.gaierror(f"test_dataflow_translation: network lookup of {host!r}")

    def no_connect(sock, address):
        rec["connects"].append(address)
        raise OSError(f"test_dataflow_translation: network access attempted to {address!r}")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)

    def soft_delete(self, gcs_path):
        rec["soft_delete_checks"].append(gcs_path)
        return False

    monkeypatch.setattr(gcsio.GcsIO, "is_soft_delete_enabled", soft_delete)

    def stage_file(self, gcs_or_local_path, file_name, stream, mime_type=None,
                   total_size=None):
        rec["uploads"][gcs_or_local_path.rstrip("/") + "/" + file_name] = stream.read()

    monkeypatch.setattr(apiclient.DataflowApplicationClient, "stage_file", stage_file)

    def create_job(self, request=None, **kwargs):
        rec["requests"].append(request)
        return dataflow.Job(id=FAKE_JOB_ID, name=request.job.name,
                            client_request_id=request.job.client_request_id,
                            current_state=dataflow.JobState.JOB_STATE_PENDING)

    monkeypatch.setattr(dataflow.JobsV1Beta3Client, "create_job", create_job)
    return rec


def _names_under(proto, root_id):
    """unique_names of a transform and all its sub-transforms."""
    t = proto.components.transforms[root_id]
    out = [t.unique_name]
    for sub in t.subtransforms:
        out += _names_under(proto, sub)
    return out


def test_dataflow_gpu_job_translation(inputs, offline_dataflow):
    d = inputs
    argv = GPU_FLAGS + [
        f"--model={d}/model.keras", f"--train=npz:{d}/train.npz",
        f"--queries=npz:{d}/queries.npz", "--output=gs://bucket/out",
        "--method=influence", "--solver=arnoldi", "--rank=8", "--arnoldi_iter=16",
        "--k=3", "--tf_threads=4", "--batch_size=64",
    ]
    # What run_lib.run() does before p.run(), minus its driver-side gs:// checks and waiting.
    opts = PipelineOptions(argv)
    opts.view_as(SetupOptions).save_main_session = False
    config = run_lib.validate(job_config(opts))
    p = run_lib.make_pipeline(opts)
    run_lib.build(p, config)
    result = p.run()

    rec = offline_dataflow
    assert rec["connects"] == [], rec["connects"]
    assert type(p.runner).__name__ == "DataflowRunner"
    assert result.job_id() == FAKE_JOB_ID
    assert "gs://bucket/tmp" in rec["soft_delete_checks"]

    # ---- the CreateJobRequest Beam built and would have sent
    assert len(rec["requests"]) == 1
    req = rec["requests"][0]
    assert (req.project_id, req.location) == ("test-project", "us-central1")
    job = req.job
    assert job.type_ == dataflow.JobType.JOB_TYPE_BATCH
    env = job.environment
    assert list(env.service_options) == [ACCELERATOR]
    assert "no_use_multiple_sdk_containers" in env.experiments
    assert "use_multiple_sdk_containers" not in env.experiments
    assert "use_runner_v2" in env.experiments  # portable (Runner v2) job: our container runs it
    assert len(env.worker_pools) == 1
    pool = env.worker_pools[0]
    assert pool.machine_type == MACHINE
    assert pool.worker_harness_container_image == IMAGE
    assert [c.container_image for c in pool.sdk_harness_container_images] == [IMAGE]
    # Pipeline options the workers receive: the GPU flags and ours (tf_threads reaches the DoFns).
    sdk_opts = dict(env.sdk_pipeline_options["options"])
    assert sdk_opts["sdk_container_image"] == IMAGE
    assert list(sdk_opts["dataflow_service_options"]) == [ACCELERATOR]
    assert "no_use_multiple_sdk_containers" in list(sdk_opts["experiments"])
    assert sdk_opts["machine_type"] == MACHINE
    assert sdk_opts["output"] == "gs://bucket/out"
    assert sdk_opts["method"] == "influence" and sdk_opts["solver"] == "arnoldi"
    assert int(sdk_opts["tf_threads"]) == 4 and int(sdk_opts["k"]) == 3
    assert sdk_opts["train"] == f"npz:{d}/train.npz"

    # ---- the graph it points at: the pipeline.pb that would have been uploaded
    url = sdk_opts["pipelineUrl"]
    assert url.startswith("gs://bucket/tmp/") and url.endswith("/pipeline.pb")
    staged = rec["uploads"][url]
    # Nothing of the project is staged (no sdist/wheel, no pickled main session): the workers
    # import pipelines/ and influence_ops/ from the image, which must therefore carry them.
    staged_names = {u.rsplit("/", 1)[1] for u in rec["uploads"]}
    assert not [n for n in staged_names if n.endswith((".tar.gz", ".whl", ".zip"))
                or n == "pickled_main_session"], staged_names
    assert sdk_opts["pipelineProtoHash"] == hashlib.sha256(staged).hexdigest()
    proto = beam_runner_api_pb2.Pipeline.FromString(staged)
    assert proto == p.runner.job.proto_pipeline

    # One Docker environment, our GPU image, runs every transform that executes user code.
    docker = common_urns.environments.DOCKER.urn
    used = {t.environment_id for t in proto.components.transforms.values() if t.environment_id}
    assert len(used) == 1, used
    (env_id,) = used
    penv = proto.components.environments[env_id]
    assert penv.urn == docker
    payload = beam_runner_api_pb2.DockerPayload.FromString(penv.payload)
    assert payload.container_image == IMAGE

    # Our stages, by label, each with user code in that environment.
    names = [n for r in proto.root_transform_ids for n in _names_under(proto, r)]
    by_name = {t.unique_name: t for t in proto.components.transforms.values()}
    for label in STAGE_LABELS:
        assert label in names, f"{label} missing from the job graph"
        leaves = [n for n in names if n.startswith(label + "/")
                  and by_name[n].environment_id == env_id]
        assert leaves, f"no user code under {label}"
    # The featurize / score steps read the fitted artifact / the query features as side inputs.
    pardo = common_urns.primitives.PAR_DO.urn
    for label in ("FeaturizeTrain", "FeaturizeQueries", "Score", "FitMethod/Fit"):
        steps = [t for n, t in by_name.items() if (n == label or n.startswith(label + "/"))
                 and t.spec.urn == pardo]
        assert any(beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload).side_inputs
                   for t in steps), f"{label}: no ParDo with a side input"


# ============================================================================ deploy/ files
REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _influence_dests():
    parser = argparse.ArgumentParser(add_help=False)
    InfluenceOptions._add_argparse_args(parser)
    return {a.dest for a in parser._actions}


def _launch_module():
    spec = importlib.util.spec_from_file_location("deploy_launch",
                                                  DEPLOY / "dataflow" / "launch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flex_template_metadata_and_launch_body_match_the_options():
    meta = json.loads((DEPLOY / "dataflow" / "flex_template_metadata.json").read_text())
    params = {p["name"]: p for p in meta["parameters"]}
    assert len(params) == len(meta["parameters"]), "duplicate parameter names"
    dests = _influence_dests()
    assert set(params) <= dests, set(params) - dests
    for name in ("model", "train", "queries", "output"):
        assert not params[name].get("isOptional"), name
    for p in meta["parameters"]:
        for rx in p.get("regexes", []):
            re.compile(rx)

    # The Cloud Scheduler request body is a valid flexTemplates:launch request ...
    text = (DEPLOY / "scheduler" / "launch_body.json").read_text()
    req = dataflow.LaunchFlexTemplateRequest.from_json(text, ignore_unknown_fields=False)
    lp = req.launch_parameter
    env = lp.environment
    assert env.machine_type == MACHINE
    assert list(env.additional_experiments) == ["no_use_multiple_sdk_containers"]
    assert env.sdk_container_image
    values = dict(lp.parameters)
    assert values["dataflow_service_options"] == ACCELERATOR
    # ... whose parameters are template parameters (or Beam's own options), in their format,
    for name, value in values.items():
        if name in params:
            for rx in params[name].get("regexes", []):
                assert re.match(rx, value.replace("${BUCKET}", "b")), (name, value, rx)
        else:
            assert name in ("dataflow_service_options", "sdk_container_image"), name
    # ... and what the launcher hands the pipeline parses as intended.
    launch = _launch_module()
    argv = launch.template_argv([f"--{k}={v}" for k, v in values.items()])
    opts = PipelineOptions(argv)
    assert opts.view_as(GoogleCloudOptions).dataflow_service_options == [ACCELERATOR]
    iopts = opts.view_as(InfluenceOptions)
    assert (iopts.method, iopts.k, iopts.tf_threads) == ("influence", 10, 8)
    assert "{datetime}" not in iopts.output and iopts.output.startswith("gs://")


def test_launch_py_translates_template_parameters():
    launch = _launch_module()
    now = datetime.datetime(2031, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)
    argv = launch.template_argv(
        ["--overwrite=true", "--write_pairwise=false", "--write_features=",
         "--output=gs://b/audit/{date}/{datetime}", "--k=5", "--model=gs://b/m.keras"], now)
    assert argv == ["--overwrite=true", "--write_pairwise=false", "--write_features=",
                    "--output=gs://b/audit/2031-02-03/20310203T040506Z",
                    "--k=5", "--model=gs://b/m.keras", "--runner=DataflowRunner"]
    assert launch.template_argv(["--runner=DataflowRunner", "--k=5"]) == \
        ["--runner=DataflowRunner", "--k=5"]
    iopts = PipelineOptions(argv).view_as(InfluenceOptions)
    assert (iopts.overwrite, iopts.write_pairwise, iopts.write_features) == (True, False, False)
    # flags also work bare, and a wrong value is an argparse error (exit 2), not silently off
    assert PipelineOptions(["--overwrite"]).view_as(InfluenceOptions).overwrite is True
    with pytest.raises(SystemExit):
        PipelineOptions(["--overwrite=maybe"]).view_as(InfluenceOptions)
