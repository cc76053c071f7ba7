package example;

import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.util.HexFormat;
import java.util.Set;

import com.nimbusds.jose.JOSEObjectType;
import com.nimbusds.jose.JWSAlgorithm;
import com.nimbusds.jose.jwk.source.JWKSourceBuilder;
import com.nimbusds.jose.proc.DefaultJOSEObjectTypeVerifier;
import com.nimbusds.jose.proc.JWSVerificationKeySelector;
import com.nimbusds.jose.proc.SecurityContext;
import com.nimbusds.jwt.JWTClaimsSet;
import com.nimbusds.jwt.proc.DefaultJWTClaimsVerifier;
import com.nimbusds.jwt.proc.DefaultJWTProcessor;
import org.apache.kafka.clients.consumer.ConsumerRecord;

/**
 * Checks the gate's attestation on a record of a trusted topic (Nimbus JOSE+JWT; EdDSA needs its
 * optional Tink dependency): the signature by a key of the gate's JWKS, the type, issuer and
 * expiry, and that the payload is the one the gate verified. Returns the verified identity.
 */
public final class AttestedConsumer {
    private final DefaultJWTProcessor<SecurityContext> jwt = new DefaultJWTProcessor<>();

    public AttestedConsumer(String jwksUrl, String gateIssuer) throws Exception {
        var keys = JWKSourceBuilder.create(new URL(jwksUrl)).build();
        jwt.setJWSTypeVerifier(new DefaultJOSEObjectTypeVerifier<>(new JOSEObjectType("tokengate-attestation+jwt")));
        jwt.setJWSKeySelector(new JWSVerificationKeySelector<>(Set.of(JWSAlgorithm.EdDSA, JWSAlgorithm.ES256), keys));
        jwt.setJWTClaimsSetVerifier(new DefaultJWTClaimsVerifier<>(
            new JWTClaimsSet.Builder().issuer(gateIssuer).build(), Set.of("exp", "iat", "msg")));
    }

    public Object identity(ConsumerRecord<String, byte[]> record) throws Exception {
        var header = record.headers().lastHeader("x-tokengate-attestation");
        JWTClaimsSet claims = jwt.process(new String(header.value(), StandardCharsets.UTF_8), null);
        var sha = MessageDigest.getInstance("SHA-256");
        String payload = HexFormat.of().formatHex(sha.digest(record.value() == null ? new byte[0] : record.value()));
        if (!payload.equals(claims.getJSONObjectClaim("msg").get("payload_sha256")))
            throw new SecurityException("payload changed after the gate verified it");
        return claims.getClaim("identity");
    }
}
