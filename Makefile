# The two set-up commands (see README): `make demo` and `make test`.
.PHONY: demo test build bench lint

demo:
	tools/dev.sh demo

test:
	tools/dev.sh test

build:
	tools/dev.sh build

bench:
	tools/dev.sh bench
