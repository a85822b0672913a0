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
DEBIAN_TEST_PACKAGES ?= curl bind9-dnsutils iproute2 openssl wrk containernetworking-plugins iputils-ping dnsperf dnsmasq-base systemd ethtool wireguard-go wireguard-tools tcpdump prometheus
# Debian tools only the benchmarks use (make bench installs them when root).
DEBIAN_BENCH_PACKAGES ?= iperf3
# kubectl proves the test Kubernetes API server faithful; Debian ships it in kubernetes-client
# (installed only when no kubectl is on PATH: other kubectl packages own the same file).
KUBECTL_PACKAGE ?= kubernetes-client

.PHONY: run test test-deps bench-deps lint format bench clean docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

RUN_DIG := dig @$(firstword $(subst :, ,$(RUN_DNS))) -p $(lastword $(subst :, ,$(RUN_DNS))) +short

# The demo as node-a, quietly: no IPAM reconcile (nothing to manage on a laptop), no echo.
run: $(STAMP)
	@echo "node-services: demo/snapshot.yaml as node-a on loopback. In another shell, try"
	@echo "  $(RUN_DIG) frontend.shop.svc.cluster.local"
	@echo "  curl -s --interface 127.0.0.2 http://$(RUN_METADATA)/latest/self/service/name"
	@echo "  curl -s http://$(RUN_ADMIN)/metrics | grep ^node_services_store_records"
	@echo "and the rest of README.md's \"Try it\". Ctrl-C stops."
	@NODE_SERVICES_IPAM=off $(BIN)/node-services run --snapshot $(RUN_SNAPSHOT) --node-name node-a \
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

# docs/configuration.md is generated from the Settings field docstrings (tests fail when stale).
docs: $(STAMP)
	$(BIN)/node-services check-config --keys --markdown > docs/configuration.md

bench-deps:
	@bash .ci/apt-install $(DEBIAN_BENCH_PACKAGES)

bench: $(STAMP) test-deps bench-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
