# Multi-stage build of the tokengate binary.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tokengate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 tokengate
COPY --from=build /src/target/release/tokengate /usr/local/bin/tokengate
USER tokengate
ENTRYPOINT ["tokengate"]
CMD ["--help"]
