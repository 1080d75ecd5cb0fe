# A minimal Tor client for the compose example: SOCKS on 9050 for private
# addresses only (Tor's `private` covers the ranges Docker allocates its
# networks from), its state in /var/lib/tor (a volume in the compose file).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends tor \
    && rm -rf /var/lib/apt/lists/*
USER debian-tor
ENTRYPOINT ["tor", "--SocksPort", "0.0.0.0:9050", "--SocksPolicy", "accept private:*", "--SocksPolicy", "reject *", "--DataDirectory", "/var/lib/tor"]
