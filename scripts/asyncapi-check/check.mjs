// Validates burrow's AsyncAPI document with AsyncAPI's own parser (the
// spec's JSON Schema plus its semantic rules), then checks that the YAML
// reads back as exactly the JSON `burrow asyncapi --output json` prints:
// burrow writes its YAML without a YAML library, so this is where a quoting
// mistake would show.
//
//   node check.mjs <document.yaml> [<document.json> | --burrow <burrow binary>]
//
// With --burrow, the JSON comes from `<binary> asyncapi --output json`, run
// with the repository's config/ and no BURROW_* variable of the caller's.
//
// Exits 1 on any error-level diagnostic or a difference; warnings are
// printed and do not fail.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';
import yaml from 'js-yaml';

const [yamlPath, jsonArg, burrowBin] = process.argv.slice(2);
if (!yamlPath || (jsonArg === '--burrow' && !burrowBin)) {
  console.error('usage: node check.mjs <document.yaml> [<document.json> | --burrow <burrow binary>]');
  process.exit(2);
}

/** The JSON document to compare with, and what to call it. */
function jsonDocument() {
  if (jsonArg === '--burrow') {
    const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('BURROW') && k !== 'APP_ENV'));
    env.BURROW_CONFIG_DIR = join(repo, 'config');
    const text = execFileSync(burrowBin, ['asyncapi', '--output', 'json'], { env, encoding: 'utf8' });
    return [JSON.parse(text), '`burrow asyncapi --output json`'];
  }
  return [JSON.parse(readFileSync(jsonArg, 'utf8')), jsonArg];
}

const source = readFileSync(yamlPath, 'utf8');
const { document, diagnostics } = await new Parser().parse(source, { source: yamlPath });
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
for (const d of diagnostics) {
  const level = d.severity === DiagnosticSeverity.Error ? 'error' : 'warning';
  console.error(`${yamlPath}: ${level}: ${d.message} at /${d.path.join('/')} (${d.code})`);
}
if (errors.length > 0 || !document) {
  console.error(`${yamlPath}: ${errors.length} error(s): not a valid AsyncAPI document`);
  process.exit(1);
}

let compared = '';
if (jsonArg) {
  const fromYaml = yaml.load(source);
  const [fromJson, what] = jsonDocument();
  if (!isDeepStrictEqual(fromYaml, fromJson)) {
    console.error(
      `${yamlPath} does not read back as ${what}: either it is stale (regenerate it with ` +
        '`cargo run --quiet -- asyncapi > docs/asyncapi.yaml`) or burrow\'s YAML writer ' +
        '(src/asyncapi/yaml.rs) wrote a scalar that YAML reads differently',
    );
    process.exit(1);
  }
  compared = `, and reads back as ${what}`;
}
const channels = document.channels().length;
const messages = document.components().messages().length;
console.log(
  `${yamlPath}: valid AsyncAPI ${document.version()} (${channels} channel(s), ${messages} message(s))${compared}`,
);
