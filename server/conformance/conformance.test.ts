// The whole Durable Streams server conformance suite, against the server at
// CONFORMANCE_TEST_URL. (The package's own CLI finds no test file under
// vitest 4, which excludes node_modules; this file is what it would run.)
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_TEST_URL
if (!baseUrl) throw new Error(`set CONFORMANCE_TEST_URL to the server's base URL`)

runConformanceTests({
  baseUrl,
  longPollTimeoutMs: Number(process.env.CONFORMANCE_LONG_POLL_MS ?? 20000),
})
