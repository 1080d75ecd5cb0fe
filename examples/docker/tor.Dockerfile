# A minimal Tor client for the compose example: SOCKS on 9050 for the
# compose network only.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends tor \
    && rm -rf /var/lib/apt/lists/*
USER debian-tor
ENTRYPOINT ["tor", "--SocksPort", "0.0.0.0:9050", "--SocksPolicy", "accept 172.28.0.0/24", "--SocksPolicy", "reject *"]
