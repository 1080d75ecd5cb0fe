# bip324-proxy as a container (a sidecar next to a Bitcoin node).
#
# scripts/container-check builds this image, runs it and carries a v2
# session through it.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The binary needs only the manifest, the lock file and src/ (config/ is
# embedded by the unit tests alone); tests/ and examples/ are not built.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --locked --release --bin bip324-proxy

FROM debian:bookworm-slim
# A fixed numeric uid and gid, so `USER` below is numeric and Kubernetes'
# runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10324 bip324 \
    && useradd --system --uid 10324 --gid 10324 --no-create-home --shell /usr/sbin/nologin bip324
COPY --from=build /src/target/release/bip324-proxy /usr/local/bin/bip324-proxy
# The image's default configuration: listen on 0.0.0.0:1324 and serve only
# 127.0.0.1 (the health check) until you allow your clients. The file is the
# only place `listen` is set: a file mounted over it wins. Environment
# variables (BIP324_PROXY_ALLOW, BIP324_PROXY_UPSTREAM, ...) and flags after
# the image name override single keys of whichever file is in place.
COPY config/container.toml /etc/bip324-proxy/bip324-proxy.toml
ENV BIP324_PROXY_CONFIG=/etc/bip324-proxy/bip324-proxy.toml
USER 10324:10324
EXPOSE 1324
# Connects to the configured listen address (127.0.0.1 for 0.0.0.0), so the
# allow-list must keep 127.0.0.1 or the check fails with "early eof".
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["bip324-proxy", "healthcheck"]
ENTRYPOINT ["bip324-proxy"]
