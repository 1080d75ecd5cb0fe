# bip324-proxy as a container (a sidecar next to a Bitcoin node).
#
# The build step is the same command .ci/run runs on every change
# (`cargo build --locked --release`), so CI exercises it even where no Docker
# engine is available.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY tests ./tests
COPY examples ./examples
RUN cargo build --locked --release

FROM debian:bookworm-slim
RUN useradd --system --uid 10324 --no-create-home --shell /usr/sbin/nologin bip324
COPY --from=build /src/target/release/bip324-proxy /usr/local/bin/bip324-proxy
COPY config/bip324-proxy.toml /etc/bip324-proxy/bip324-proxy.toml
USER bip324
# Inside the container the proxy must listen on all interfaces. The proxy
# refuses a non-loopback address unless clients are restricted: set
# BIP324_PROXY_ALLOW to the container network (and 127.0.0.1 for the health
# check), or BIP324_PROXY_CLIENT_USERNAME/_PASSWORD. Mount your own file over
# /etc/bip324-proxy/bip324-proxy.toml to configure everything else.
ENV BIP324_PROXY_LISTEN=0.0.0.0:1324 \
    BIP324_PROXY_CONFIG=/etc/bip324-proxy/bip324-proxy.toml
EXPOSE 1324
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["bip324-proxy", "healthcheck"]
ENTRYPOINT ["bip324-proxy"]
