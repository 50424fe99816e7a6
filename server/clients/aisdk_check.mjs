// Checks an AI SDK view of a finished run with the `ai` package: the UI
// message stream, read whole, and cut twice (inside a text part, inside a
// tool call's input) and resumed with Last-Event-ID, gives the same
// UIMessage through readUIMessageStream; a resume request (?resume=1) for
// the ended run answers 204, as useChat({ resume: true }) expects.
// Usage: node aisdk_check.mjs http://HOST/v1/aisdk/runs/RUN
import { readUIMessageStream } from "ai"

const url = process.argv[2]
if (!url) throw new Error("usage: node aisdk_check.mjs URL")

async function read(lastEventId) {
  const headers = lastEventId ? { "Last-Event-ID": lastEventId } : {}
  const response = await fetch(url, { headers })
  if (response.status !== 200) throw new Error(`${url}: ${response.status} ${await response.text()}`)
  if (response.headers.get("x-vercel-ai-ui-message-stream") !== "v1") {
    throw new Error("no x-vercel-ai-ui-message-stream: v1 header")
  }
  const text = await response.text()
  if (!text.endsWith("data: [DONE]\n\n")) throw new Error("the stream does not end with [DONE]")
  return text
    .split("\n\n")
    .filter((block) => block.startsWith("id: "))
    .map((block) => {
      const lines = block.split("\n")
      return { id: lines[0].slice(4), chunk: JSON.parse(lines[1].slice(6)) }
    })
}

async function message(chunks) {
  const stream = new ReadableStream({
    start(controller) {
      for (const { chunk } of chunks) controller.enqueue(chunk)
      controller.close()
    },
  })
  let last
  for await (const snapshot of readUIMessageStream({ stream, terminateOnError: true })) last = snapshot
  return last
}

const whole = await read()
const wholeMessage = await message(whole)
if (!wholeMessage || !wholeMessage.parts.some((p) => p.type === "text")) {
  throw new Error(`no text in ${JSON.stringify(wholeMessage)}`)
}
const cut1 = whole.findIndex((e) => e.chunk.type === "text-delta")
if (whole[cut1 + 1]?.chunk.type !== "text-delta") throw new Error("no text part to cut inside")
const part1 = whole.slice(0, cut1 + 1)
const rest1 = await read(part1.at(-1).id)
const cut2 = rest1.findIndex((e) => e.chunk.type === "tool-input-delta")
if (cut2 < 0) throw new Error("no tool input to cut inside")
const part2 = rest1.slice(0, cut2 + 1)
const rest2 = await read(part2.at(-1).id)
const joined = [...part1, ...part2, ...rest2]
if (JSON.stringify(joined) !== JSON.stringify(whole)) throw new Error("the resumed stream differs")
const joinedMessage = await message(joined)
if (JSON.stringify(joinedMessage) !== JSON.stringify(wholeMessage)) {
  throw new Error(`different UIMessage:\n${JSON.stringify(joinedMessage)}\n${JSON.stringify(wholeMessage)}`)
}
const resume = await fetch(`${url}?resume=1`)
if (resume.status !== 204) throw new Error(`resume of an ended run: ${resume.status}, not 204`)
console.log(`readUIMessageStream passed: ${whole.length} chunks, ${wholeMessage.parts.length} parts, whole and cut and resumed twice`)
