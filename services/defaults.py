"""Defaults that the `distillery` command shows and the services enforce, in a module that imports
nothing heavy: the CLI reads them at start-up without loading torch, FastAPI or the demo."""

# GET /v1/jobs pages (services.api and `distillery jobs --limit`)
JOBS_PAGE_DEFAULT = 50
JOBS_PAGE_MAX = 200
# The demo job's step counts (services.demo.DemoJob; `distillery demo --distill-steps/--warmup-steps`)
DEMO_DISTILL_STEPS = 600
DEMO_WARMUP_STEPS = 60
