# Two commands do everything on a fresh machine:
#   make run    the operator's main job (brings up a local control plane when no cluster is configured)
#   make test   the whole test suite (what CI runs)
.PHONY: test run crds control-plane stop bench

test:
	hack/test.sh

run:
	hack/demo.sh

crds:
	cargo run -q -- crds --dir crds

control-plane:
	hack/control-plane.sh start

stop:
	hack/demo.sh stop
	hack/control-plane.sh stop

bench:
	python3 hack/bench.py
