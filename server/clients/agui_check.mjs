// Checks an AG-UI view of a finished run with the real client packages:
// every event parses with @ag-ui/core's event schema; the whole stream, and
// the stream cut twice (inside a text message, inside a tool call's
// arguments) and resumed with Last-Event-ID, pass @ag-ui/client's
// verifyEvents; and the resumed stream is the whole one, event for event.
// Usage: node agui_check.mjs http://HOST/v1/agui/runs/RUN
import { EventSchemas } from "@ag-ui/core/schemas"
import { verifyEvents } from "@ag-ui/client"
import { from, lastValueFrom, toArray } from "rxjs"

const url = process.argv[2]
if (!url) throw new Error("usage: node agui_check.mjs URL")

async function read(lastEventId) {
  const headers = lastEventId ? { "Last-Event-ID": lastEventId } : {}
  const response = await fetch(url, { headers })
  if (response.status === 204) return []
  if (response.status !== 200) throw new Error(`${url}: ${response.status} ${await response.text()}`)
  const text = await response.text()
  return text
    .split("\n\n")
    .filter((block) => block.includes("data: "))
    .map((block) => {
      const lines = block.split("\n")
      const id = lines.find((l) => l.startsWith("id: "))?.slice(4)
      const data = lines.find((l) => l.startsWith("data: "))?.slice(6)
      return { id, event: JSON.parse(data) }
    })
}

async function verify(events, what) {
  for (const { event } of events) {
    const parsed = EventSchemas.safeParse(event)
    if (!parsed.success) throw new Error(`${what}: ${JSON.stringify(event)}: ${parsed.error}`)
  }
  await lastValueFrom(from(events.map((e) => e.event)).pipe(verifyEvents(false), toArray()))
}

const whole = await read()
await verify(whole, "whole")
const cut1 = whole.findIndex((e) => e.event.type === "TEXT_MESSAGE_CONTENT")
if (cut1 < 0 || whole[cut1 + 1]?.event.type !== "TEXT_MESSAGE_CONTENT") {
  throw new Error("the run has no text message to cut inside")
}
const part1 = whole.slice(0, cut1 + 1)
const rest1 = await read(part1.at(-1).id)
const cut2 = rest1.findIndex((e) => e.event.type === "TOOL_CALL_ARGS")
if (cut2 < 0) throw new Error("the run has no tool call arguments to cut inside")
const part2 = rest1.slice(0, cut2 + 1)
const rest2 = await read(part2.at(-1).id)
const joined = [...part1, ...part2, ...rest2]
if (JSON.stringify(joined) !== JSON.stringify(whole)) {
  throw new Error(`resumed stream differs:\n${JSON.stringify(joined)}\n${JSON.stringify(whole)}`)
}
await verify(joined, "cut and resumed")
console.log(`verifyEvents passed: ${whole.length} events, whole and cut and resumed twice`)
