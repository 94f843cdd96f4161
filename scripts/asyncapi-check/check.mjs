// Validates burrow's AsyncAPI document with AsyncAPI's own parser (the
// spec's JSON Schema plus its semantic rules), then checks that the YAML
// reads back as exactly the JSON `burrow asyncapi --output json` prints:
// burrow writes its YAML without a YAML library, so this is where a quoting
// mistake would show.
//
//   node check.mjs <document.yaml> [<document.json>]
//
// Exits 1 on any error-level diagnostic or a difference; warnings are
// printed and do not fail.
import { readFileSync } from 'node:fs';
import { isDeepStrictEqual } from 'node:util';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';
import yaml from 'js-yaml';

const [yamlPath, jsonPath] = process.argv.slice(2);
if (!yamlPath) {
  console.error('usage: node check.mjs <document.yaml> [<document.json>]');
  process.exit(2);
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
if (jsonPath) {
  const fromYaml = yaml.load(source);
  const fromJson = JSON.parse(readFileSync(jsonPath, 'utf8'));
  if (!isDeepStrictEqual(fromYaml, fromJson)) {
    console.error(
      `${yamlPath} does not read back as ${jsonPath}: burrow's YAML writer (src/asyncapi/yaml.rs) ` +
        'wrote a scalar that YAML reads differently',
    );
    process.exit(1);
  }
  compared = `, and reads back as ${jsonPath}`;
}
const channels = document.channels().length;
const messages = document.components().messages().length;
console.log(
  `${yamlPath}: valid AsyncAPI ${document.version()} (${channels} channel(s), ${messages} message(s))${compared}`,
);
