# Two commands do everything on a fresh machine:
#   make run    the operator's main job (brings up a local control plane when no cluster is configured)
#   make test   the whole test suite (what CI runs)
.PHONY: test run crds control-plane stop bench chaos

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

# The chaos test at length (kill -9 the operator during churn, check the revocation invariants); the
# test suite runs 4 rounds and 1 restart of a private etcd + kube-apiserver. CHAOS_ROUNDS,
# CHAOS_RESTARTS and CHAOS_SEED (printed by every run) override.
chaos:
	hack/control-plane.sh start >/dev/null
	DELEGATION_TEST_KUBECONFIG=$$(hack/control-plane.sh env | sed -n 's/^export KUBECONFIG=//p') \
	  CHAOS_ROUNDS=$${CHAOS_ROUNDS:-40} CHAOS_RESTARTS=$${CHAOS_RESTARTS:-6} cargo test --locked --test chaos -- --nocapture
