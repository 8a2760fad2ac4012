"""Names shared by the pipeline's stages: metrics namespace, output tags and tables, markers."""

NAMESPACE = "influence"           # every Beam metric of the job lives under this namespace

DEAD = "dead"                     # tagged output of rejected rows: DeadLetter records
TIMING = "timing"                 # tagged output of (stage, seconds) records

SUCCESS = "_SUCCESS"              # written last: a reader that sees it sees a whole result
CLAIM = "_RUNNING"                # claim of the run writing the output (created exclusively)
MANIFEST = "run_manifest.json"
METRICS = "run_metrics.json"
ARTIFACT = "artifact"             # the fitted method, under --output

# Output tables (Parquet folders under --output).
TOPK = "topk"
SELF_INFLUENCE = "self_influence"
PAIRWISE = "pairwise"
FEATURES = "features"
GROUPS = "groups"
GROUP_SELF = "group_self"
DEAD_LETTER = "dead_letter"
TABLES = (TOPK, SELF_INFLUENCE, PAIRWISE, FEATURES, GROUPS, GROUP_SELF, DEAD_LETTER)
