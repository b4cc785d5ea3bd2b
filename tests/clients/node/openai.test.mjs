// The official `openai` npm client against a live nitro_torch server on the real default model.
// Run by tests/clients/test_openai_node.py, or by hand:
//   NITRO_BASE_URL=http://127.0.0.1:3928/v1 NITRO_TOOL_BASE_URL=http://127.0.0.1:3929/v1 \
//     node --test tests/clients/node/openai.test.mjs
// NITRO_BASE_URL: the default model's API (…/v1); NITRO_TOOL_BASE_URL: a model whose chat template renders tools
// (the tiny tool model of tests/tool_fixtures.py). Greedy answers are compared with each other, not fixed text.
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import OpenAI from 'openai';

const BASE_URL = process.env.NITRO_BASE_URL;
const TOOL_BASE_URL = process.env.NITRO_TOOL_BASE_URL;
if (!BASE_URL) throw new Error('set NITRO_BASE_URL to the server API, e.g. http://127.0.0.1:3928/v1');

const client = new OpenAI({ baseURL: BASE_URL, apiKey: 'unused', maxRetries: 0, timeout: 300_000 });
const HELLO = [{ role: 'user', content: 'Hello' }];
const ROOM = 24; // room for the greedy answer to HELLO to end on its own
const WEATHER_QUESTION = [{ role: 'user', content: 'What is the weather in Tokyo, in celsius?' }];
const WEATHER_TOOL = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'Current weather in a city.',
    parameters: {
      type: 'object',
      properties: {
        city: { type: 'string', enum: ['Paris', 'Tokyo', 'Lima'] },
        unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
      },
      required: ['city', 'unit'],
      additionalProperties: false,
    },
  },
};

/** Greedy and short unless told otherwise; unknown fields (vLLM's extras) go into the body as they are. */
function chat(fields = {}) {
  return client.chat.completions.create({ model: '', messages: HELLO, max_tokens: 12, temperature: 0, ...fields });
}

const content = (reply) => reply.choices[0].message.content ?? '';
const tokensOf = (reply) => reply.choices[0].logprobs.content.map((entry) => entry.token);

/** Token ids through the server's /tokenize (vLLM's route), so the test needs no tokenizer of its own. */
async function tokenize(text) {
  const root = BASE_URL.replace(/\/v1\/?$/, '');
  const response = await fetch(`${root}/tokenize`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: '', prompt: text, add_special_tokens: false }),
  });
  assert.equal(response.status, 200);
  return (await response.json()).tokens;
}

async function singleTokenId(text) {
  const ids = await tokenize(text);
  assert.equal(ids.length, 1, `${JSON.stringify(text)} is one token`);
  return ids[0];
}

async function collect(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

let greedy; // the reference: the greedy answer to HELLO, ended by the model, with top-2 logprobs
let servedName;

before(async () => {
  greedy = await chat({ max_tokens: ROOM, logprobs: true, top_logprobs: 2 });
  assert.equal(greedy.choices[0].finish_reason, 'stop', 'the reference answer must end on its own');
  assert.ok(content(greedy).split(/\s+/).length >= 4, 'the stop tests need a few words');
  servedName = (await client.models.list()).data[0].id;
});

test('basic chat: an answer and usage that counts every generated token', () => {
  assert.equal(greedy.object, 'chat.completion');
  assert.match(greedy.id, /^chatcmpl-/);
  assert.equal(greedy.model, servedName);
  assert.equal(greedy.choices[0].message.role, 'assistant');
  assert.ok(content(greedy).length > 0);
  const { prompt_tokens, completion_tokens, total_tokens } = greedy.usage;
  assert.ok(prompt_tokens > 0);
  assert.equal(completion_tokens, greedy.choices[0].logprobs.content.length);
  assert.equal(total_tokens, prompt_tokens + completion_tokens);
});

test('model: the served name and a name copied from elsewhere answer like ""', async () => {
  const named = await chat({ model: servedName, max_tokens: ROOM });
  assert.equal(content(named), content(greedy));
  const copied = await chat({ model: 'gpt-4o-mini', max_tokens: ROOM });
  assert.equal(copied.model, servedName);
  assert.equal(content(copied), content(greedy));
});

test('messages: text parts are the string content; an image part is a 400', async () => {
  const textParts = [{ role: 'user', content: [{ type: 'text', text: 'Hello' }] }];
  const parts = await chat({ messages: textParts, max_tokens: ROOM });
  assert.equal(content(parts), content(greedy));
  assert.equal(parts.usage.prompt_tokens, greedy.usage.prompt_tokens);
  const image = [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'https://example.com/a.png' } }] }];
  await assert.rejects(chat({ messages: image }), (err) => {
    assert.ok(err instanceof OpenAI.BadRequestError);
    assert.match(err.message, /does not accept images/);
    return true;
  });
});

test('a 400 surfaces as OpenAI.BadRequestError with error.param', async () => {
  await assert.rejects(chat({ temperature: -1 }), (err) => {
    assert.ok(err instanceof OpenAI.BadRequestError);
    assert.equal(err.status, 400);
    assert.equal(err.param, 'temperature');
    assert.equal(err.error.param, 'temperature');
    return true;
  });
});

test('stream with include_usage: the plain answer, then a usage chunk', async () => {
  const chunks = await collect(await chat({
    max_tokens: ROOM, stream: true, stream_options: { include_usage: true }, logprobs: true, top_logprobs: 2,
  }));
  assert.equal(chunks[0].choices[0].delta.role, 'assistant');
  const last = chunks.at(-1);
  const deltas = chunks.slice(0, -1);
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.prompt_tokens, greedy.usage.prompt_tokens);
  assert.equal(last.usage.completion_tokens, greedy.usage.completion_tokens);
  assert.ok(deltas.every((chunk) => chunk.usage == null));
  assert.equal(deltas.map((chunk) => chunk.choices[0].delta.content ?? '').join(''), content(greedy));
  assert.deepEqual(deltas.map((chunk) => chunk.choices[0].finish_reason).filter(Boolean), ['stop']);
  const streamed = deltas.flatMap((chunk) => chunk.choices[0].logprobs?.content ?? []);
  assert.deepEqual(streamed.map((entry) => entry.token), tokensOf(greedy));
});

test('stream_options.continuous_usage_stats (vLLM): usage in every chunk, counting up', async () => {
  const chunks = await collect(await chat({
    max_tokens: ROOM, stream: true, stream_options: { include_usage: true, continuous_usage_stats: true },
  }));
  const counts = chunks.map((chunk) => chunk.usage.completion_tokens);
  assert.deepEqual(counts, [...counts].sort((a, b) => a - b));
  assert.equal(counts.at(-1), greedy.usage.completion_tokens);
});

test('stop: a string or a list cuts before the stop and reports "stop"', async () => {
  const text = content(greedy);
  const words = text.split(/\s+/);
  const stop = ` ${words[2]}`;
  const one = await chat({ stop, max_tokens: ROOM });
  assert.equal(one.choices[0].finish_reason, 'stop');
  assert.equal(content(one), text.slice(0, text.indexOf(stop)));
  const list = await chat({ stop: ['<never seen>', ` ${words[3]}`, stop], max_tokens: ROOM });
  assert.equal(content(list), text.slice(0, text.indexOf(stop)));
  const kept = await chat({ stop, max_tokens: ROOM, include_stop_str_in_output: true });
  assert.equal(content(kept), text.slice(0, text.indexOf(stop) + stop.length));
});

test('max_tokens and max_completion_tokens report "length"', async () => {
  for (const field of ['max_tokens', 'max_completion_tokens']) {
    const reply = await client.chat.completions.create({ model: '', messages: HELLO, temperature: 0, [field]: 3 });
    assert.equal(reply.choices[0].finish_reason, 'length', field);
    assert.equal(reply.usage.completion_tokens, 3, field);
    assert.equal(content(reply), tokensOf(greedy).slice(0, 3).join(''), field);
  }
});

test('vLLM extras: ignore_eos runs to max_tokens, stop_token_ids end there, top_k 1 is greedy', async () => {
  const limit = greedy.usage.completion_tokens + 4;
  const long = await chat({ max_tokens: limit, ignore_eos: true });
  assert.equal(long.choices[0].finish_reason, 'length');
  assert.equal(long.usage.completion_tokens, limit);
  assert.ok(content(long).startsWith(content(greedy)));
  const stopped = await chat({ max_tokens: ROOM, stop_token_ids: [await singleTokenId(tokensOf(greedy)[2])] });
  assert.equal(stopped.choices[0].finish_reason, 'stop');
  assert.equal(stopped.usage.completion_tokens, 3);
  const hot = await chat({ temperature: 1.5, seed: 5, max_tokens: ROOM });
  const cut = await chat({ temperature: 1.5, seed: 5, max_tokens: ROOM, top_k: 1 });
  assert.notEqual(content(hot), content(greedy));
  assert.equal(content(cut), content(greedy));
});

test('n=3: three choices, the prompt counted once', async () => {
  const reply = await chat({ n: 3, temperature: 1, seed: 7, max_tokens: 8, logprobs: true });
  assert.deepEqual(reply.choices.map((choice) => choice.index), [0, 1, 2]);
  assert.ok(new Set(reply.choices.map((choice) => choice.message.content)).size > 1);
  assert.equal(reply.usage.prompt_tokens, greedy.usage.prompt_tokens);
  const generated = reply.choices.reduce((sum, choice) => sum + choice.logprobs.content.length, 0);
  assert.equal(reply.usage.completion_tokens, generated);
});

test('seed: the same seed at temperature 1 gives the same answer, another seed another', async () => {
  const [first, again, other] = await Promise.all(
    [1234, 1234, 1235].map((seed) => chat({ temperature: 1, seed, max_tokens: 16 })));
  assert.equal(content(first), content(again));
  assert.notEqual(content(first), content(other));
});

test('logprobs: token, logprob, bytes and sorted top_logprobs led by the greedy token', () => {
  const entries = greedy.choices[0].logprobs.content;
  for (const entry of entries) {
    assert.ok(entry.logprob <= 0);
    assert.deepEqual(entry.bytes, [...Buffer.from(entry.token, 'utf8')]);
    assert.equal(entry.top_logprobs.length, 2);
    assert.ok(entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob);
    assert.equal(entry.top_logprobs[0].token, entry.token);
  }
  assert.equal(entries.slice(0, -1).map((entry) => entry.token).join(''), content(greedy)); // then the EOS
});

test('logit_bias: -100 bans the greedy first token, +100 forces a token', async () => {
  const first = tokensOf(greedy)[0];
  const banned = await chat({ max_tokens: 4, logprobs: true, logit_bias: { [await singleTokenId(first)]: -100 } });
  assert.notEqual(tokensOf(banned)[0], first);
  const forced = await chat({ max_tokens: 4, logprobs: true, logit_bias: { [await singleTokenId(' Paris')]: 100 } });
  assert.deepEqual(tokensOf(forced), Array(4).fill(' Paris'));
});

test('response_format json_schema: the answer parses and has the required keys and types', async () => {
  const schema = {
    type: 'object',
    properties: {
      name: { type: 'string', maxLength: 12 },
      age: { type: 'integer', minimum: 0 },
      pet: { type: 'string', enum: ['cat', 'dog'] },
    },
    required: ['name', 'age', 'pet'],
    additionalProperties: false,
  };
  const reply = await chat({
    messages: [{ role: 'user', content: "Give a person's name, age and pet as JSON." }],
    max_tokens: 64,
    response_format: { type: 'json_schema', json_schema: { name: 'person', schema } },
  });
  assert.equal(reply.choices[0].finish_reason, 'stop');
  const person = JSON.parse(content(reply));
  assert.deepEqual(Object.keys(person).sort(), ['age', 'name', 'pet']);
  assert.equal(typeof person.name, 'string');
  assert.ok(person.name.length <= 12);
  assert.ok(Number.isInteger(person.age) && person.age >= 0);
  assert.ok(['cat', 'dog'].includes(person.pet));
});

const toolSkip = !TOOL_BASE_URL && 'NITRO_TOOL_BASE_URL is not set';
test('tools: a "required" call round trip on a model whose template renders tools', { skip: toolSkip }, async () => {
  const tools = new OpenAI({ baseURL: TOOL_BASE_URL, apiKey: 'unused', maxRetries: 0, timeout: 300_000 });
  const reply = await tools.chat.completions.create({
    model: '', messages: WEATHER_QUESTION, tools: [WEATHER_TOOL], tool_choice: 'required',
    parallel_tool_calls: false, max_tokens: 200, seed: 1,
  });
  const choice = reply.choices[0];
  assert.equal(choice.finish_reason, 'tool_calls');
  assert.equal(choice.message.tool_calls.length, 1);
  const [call] = choice.message.tool_calls;
  assert.equal(call.type, 'function');
  assert.equal(call.function.name, 'get_weather');
  const args = JSON.parse(call.function.arguments);
  assert.ok(['Paris', 'Tokyo', 'Lima'].includes(args.city));
  assert.ok(['celsius', 'fahrenheit'].includes(args.unit));
  const history = [...WEATHER_QUESTION, choice.message,
    { role: 'tool', tool_call_id: call.id, content: '22 degrees, sunny' }];
  const answer = await tools.chat.completions.create({
    model: '', messages: history, tools: [WEATHER_TOOL], tool_choice: 'none', max_tokens: 8, seed: 1,
  });
  assert.ok(['stop', 'length'].includes(answer.choices[0].finish_reason));
  assert.equal(answer.choices[0].message.tool_calls ?? null, null);
  assert.equal(typeof answer.choices[0].message.content, 'string');
});

test('tools on the default model (its template has no tools) use the built-in tool prompt', async () => {
  const reply = await chat({
    messages: WEATHER_QUESTION, tools: [WEATHER_TOOL], max_tokens: 100,
    tool_choice: { type: 'function', function: { name: 'get_weather' } },
  });
  assert.equal(reply.choices[0].finish_reason, 'tool_calls');
  const [call] = reply.choices[0].message.tool_calls;
  assert.equal(call.function.name, 'get_weather');
  const args = JSON.parse(call.function.arguments);
  assert.ok(['Paris', 'Tokyo', 'Lima'].includes(args.city));
  assert.ok(['celsius', 'fahrenheit'].includes(args.unit));
});

test('embeddings: float and base64 give the same indexed unit vectors', async () => {
  const input = ['The cat sat on the mat.', 'Stock markets fell sharply today.'];
  const floats = await client.embeddings.create({ model: '', input, encoding_format: 'float' });
  assert.deepEqual(floats.data.map((item) => item.index), [0, 1]);
  for (const { embedding } of floats.data) {
    assert.ok(Array.isArray(embedding) && embedding.length > 1);
    assert.ok(Math.abs(Math.hypot(...embedding) - 1) < 1e-4);
  }
  const explicit = await client.embeddings.create({ model: '', input, encoding_format: 'base64' });
  const decoded = await client.embeddings.create({ model: '', input }); // the client asks for base64, decodes it
  for (const [index, want] of floats.data.entries()) {
    const raw = Buffer.from(explicit.data[index].embedding, 'base64');
    const fromBase64 = new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4);
    for (const got of [fromBase64, decoded.data[index].embedding]) {
      assert.equal(got.length, want.embedding.length);
      assert.ok(want.embedding.every((value, i) => Math.abs(value - got[i]) < 1e-6));
    }
  }
  assert.ok(floats.data[0].embedding.some((value, i) => Math.abs(value - floats.data[1].embedding[i]) > 1e-3));
});

test('completions: a text prompt and its token ids give the same text; length is reported', async () => {
  const prompt = 'Once upon a time';
  const byText = await client.completions.create({ model: '', prompt, max_tokens: 8, temperature: 0 });
  const ids = await tokenize(prompt);
  const byIds = await client.completions.create({ model: '', prompt: ids, max_tokens: 8, temperature: 0 });
  assert.equal(byText.object, 'text_completion');
  assert.equal(byText.choices[0].finish_reason, 'length');
  assert.ok(byText.choices[0].text.length > 0);
  assert.equal(byIds.choices[0].text, byText.choices[0].text);
  assert.equal(byText.usage.completion_tokens, 8);
  assert.equal(byText.usage.prompt_tokens, byIds.usage.prompt_tokens);
  await assert.rejects(client.completions.create({ model: '', prompt, echo: true, max_tokens: 2 }), (err) => {
    assert.ok(err instanceof OpenAI.BadRequestError);
    assert.equal(err.param, 'echo');
    return true;
  });
});

test('models: list and retrieve the served model; an unknown one is a NotFoundError', async () => {
  const models = [];
  for await (const model of client.models.list()) models.push(model);
  assert.deepEqual(models.map((model) => [model.id, model.object]), [[servedName, 'model']]);
  assert.equal((await client.models.retrieve(servedName)).id, servedName);
  await assert.rejects(client.models.retrieve('no-such-model'), OpenAI.NotFoundError);
});
