// The test runner: doctest's own main(). Every other tests/*.cpp adds cases.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
