"""Fast tests of code on synthetic fixtures (the edit loop: `make test-fast`)."""
