# node-services: `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Loopback addresses of `make run` (unprivileged ports).
RUN_DNS ?= 127.0.0.1:5353
RUN_METADATA ?= 127.0.0.1:8080
RUN_ADMIN ?= 127.0.0.1:9254
RUN_SNAPSHOT ?= demo/snapshot.yaml
# No real upstream DNS: names outside the cluster zones get SERVFAIL at once (nothing listens
# on 127.0.0.1:1), so `make run` never sends a query off this machine.
RUN_UPSTREAM ?= 127.0.0.1:1

# Debian tools the tests use (installed when root; tests skip with a reason without them).
DEBIAN_TEST_PACKAGES ?= curl bind9-dnsutils iproute2 openssl wrk containernetworking-plugins iputils-ping dnsperf dnsmasq-base systemd ethtool prometheus
# Debian tools only the benchmarks use (make bench installs them when root).
DEBIAN_BENCH_PACKAGES ?= iperf3
# kubectl proves the test Kubernetes API server faithful; Debian ships it in kubernetes-client
# (installed only when no kubectl is on PATH: other kubectl packages own the same file).
KUBECTL_PACKAGE ?= kubernetes-client

.PHONY: run test test-deps bench-deps lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

run: $(STAMP)
	@echo "node-services on loopback with $(RUN_SNAPSHOT). Try, in another shell:"
	@echo "  curl -s http://$(RUN_ADMIN)/readyz"
	@echo "  curl -s http://$(RUN_ADMIN)/metrics | grep ^node_services_"
	@echo "  dig @$(firstword $(subst :, ,$(RUN_DNS))) -p $(lastword $(subst :, ,$(RUN_DNS))) frontend.shop.svc.cluster.local"
	@echo "  curl -s http://$(RUN_METADATA)/latest/services ; curl -s http://$(RUN_METADATA)/latest/self/host/name"
	@echo "  kill -HUP <pid> reloads the snapshot; Ctrl-C stops."
	$(BIN)/node-services run --snapshot $(RUN_SNAPSHOT) --node-name node-a \
		--dns-listen $(RUN_DNS) --metadata-listen $(RUN_METADATA) --admin-listen $(RUN_ADMIN) \
		--upstream $(RUN_UPSTREAM)

test-deps:
	@bash .ci/apt-install $(DEBIAN_TEST_PACKAGES)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v kubectl >/dev/null; then \
		echo "apt-get install: $(KUBECTL_PACKAGE)"; apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(KUBECTL_PACKAGE) >/dev/null || \
			echo "no kubectl: the kubectl tests skip with a reason"; \
	fi

test: $(STAMP) test-deps
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check node_services tests bench
	$(BIN)/ruff format --check node_services tests bench
	$(BIN)/mypy node_services
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format node_services tests bench
	$(BIN)/ruff check --fix node_services tests bench

bench-deps:
	@bash .ci/apt-install $(DEBIAN_BENCH_PACKAGES)

bench: $(STAMP) test-deps bench-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
